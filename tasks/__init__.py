"""Tasks, one file per suite family. Each file registers its tasks into ``harness.api.TASKS``.

``INDEX`` maps every task name to the module that registers it, so names can be listed and checked without
importing torch-heavy code. Adding a task: write or extend its family's file, add its name here.
"""

INDEX: dict[str, str] = {
    "demo-digits": "tasks.demo",
    "demo-textures": "tasks.demo",
    "demo-position": "tasks.demo",
    "demo-count": "tasks.demo",
    "demo-upstream": "tasks.demo",
    # FGVC, VPT's JSON splits (tasks/fgvc.py)
    "fgvc-cub": "tasks.fgvc",
    "fgvc-nabirds": "tasks.fgvc",
    "fgvc-flowers": "tasks.fgvc",
    "fgvc-dogs": "tasks.fgvc",
    "fgvc-cars": "tasks.fgvc",
    # VTAB-1k, image-folder export; vtab-<folder> (tasks/vtab.py)
    "vtab-cifar": "tasks.vtab",
    "vtab-caltech101": "tasks.vtab",
    "vtab-dtd": "tasks.vtab",
    "vtab-oxford_flowers102": "tasks.vtab",
    "vtab-oxford_iiit_pet": "tasks.vtab",
    "vtab-svhn": "tasks.vtab",
    "vtab-sun397": "tasks.vtab",
    "vtab-patch_camelyon": "tasks.vtab",
    "vtab-eurosat": "tasks.vtab",
    "vtab-resisc45": "tasks.vtab",
    "vtab-diabetic_retinopathy": "tasks.vtab",
    "vtab-clevr_count": "tasks.vtab",
    "vtab-clevr_dist": "tasks.vtab",
    "vtab-dmlab": "tasks.vtab",
    "vtab-kitti": "tasks.vtab",
    "vtab-dsprites_loc": "tasks.vtab",
    "vtab-dsprites_ori": "tasks.vtab",
    "vtab-smallnorb_azi": "tasks.vtab",
    "vtab-smallnorb_ele": "tasks.vtab",
    # semantic segmentation: VOC2012 and Cityscapes in their own layouts (tasks/segmentation.py)
    "seg-voc": "tasks.segmentation",
    "seg-cityscapes": "tasks.segmentation",
}

#: artifacts (weights, checkpoints) that task families know how to make: name -> registering module
ARTIFACTS: dict[str, str] = {
    "demo-backbone": "tasks.demo:demo_backbone",
}
