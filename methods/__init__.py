"""Transfer-learning methods, one file per family.

``INDEX`` is the one place a method's name is written: name -> ``"module:Class"``. The registry
(:mod:`harness.registry`) imports the module only when the method is used, instantiates the class and gives it the
name, so names can be listed and checked without importing torch-heavy code. Adding a method: write its class in
its family's file, add one line here.
"""

INDEX: dict[str, str] = {
    "linear": "methods.linear:LinearProbe",
    "finetune": "methods.finetune:FullFinetune",
    "vpt-deep": "methods.vpt:VPTDeep",
    "vpt-shallow": "methods.vpt:VPTShallow",
    "lora": "methods.lora:LoRA",
    "toast": "methods.toast:ToastMethod",
    "toast-lite": "methods.toast:ToastLite",
    "toast-early": "methods.toast:ToastEarly",
    "toast-late": "methods.toast:ToastLate",
    "toast-nopretune": "methods.toast:ToastNoPretune",
    "toast-notoken": "methods.toast:ToastNoToken",
    "toast-nochannel": "methods.toast:ToastNoChannel",
}

#: artifacts (weights, checkpoints) that methods know how to make: name -> "module:function"
ARTIFACTS: dict[str, str] = {"toast-pretuned": "methods.toast_pretune:toast_pretuned"}
