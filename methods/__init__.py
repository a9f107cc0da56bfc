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
    # PETL baselines (docs/protocol.md §4.5): through peft, then written here
    "dora": "methods.peft_methods:DoRA",
    "ia3": "methods.peft_methods:IA3",
    "vera": "methods.peft_methods:VeRA",
    "loha": "methods.peft_methods:LoHa",
    "lokr": "methods.peft_methods:LoKr",
    "oft": "methods.peft_methods:OFT",
    "adalora": "methods.peft_methods:AdaLoRA",
    "bitfit": "methods.bitfit:BitFit",
    "adapter": "methods.adapter:Adapter",
    "adaptformer": "methods.adapter:AdaptFormer",
    "ssf": "methods.ssf:SSF",
}

#: artifacts (weights, checkpoints) that methods know how to make: name -> "module:function"
ARTIFACTS: dict[str, str] = {"toast-pretuned": "methods.toast_pretune:toast_pretuned"}
