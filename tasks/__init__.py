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
}

#: artifacts (weights, checkpoints) that task families know how to make: name -> registering module
ARTIFACTS: dict[str, str] = {
    "demo-backbone": "tasks.demo",
}
