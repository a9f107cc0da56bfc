"""Transfer-learning methods, one file per family. Each file registers its methods into ``harness.api.METHODS``.

``INDEX`` maps every method name to the module that registers it, so names can be listed and checked without
importing torch-heavy code. Adding a method: write its file, add its names here.
"""

INDEX: dict[str, str] = {
    "linear": "methods.linear",
    "finetune": "methods.finetune",
    "vpt-deep": "methods.vpt",
    "vpt-shallow": "methods.vpt",
    "lora": "methods.lora",
    "toast": "methods.toast",
    "toast-lite": "methods.toast",
    "toast-early": "methods.toast",
    "toast-late": "methods.toast",
    "toast-nopretune": "methods.toast",
    "toast-notoken": "methods.toast",
    "toast-nochannel": "methods.toast",
}

#: artifacts (weights, checkpoints) that methods know how to make: name -> registering module
ARTIFACTS: dict[str, str] = {"toast-pretuned": "methods.toast_pretune"}
