"""Records written straight into a store, for tests of what is computed from records (tables, figures, t-tests):
a suite with the fixed protocol, whose final trials' hyperparameters are known without a search, and ``put`` to
give a cell's final trials chosen metric values."""

from __future__ import annotations

from harness.plan import Cell, final_specs, fixed_hparams

FIXED = {"protocol": {"kind": "fixed", "final": {"train": "train800val200", "eval": "test"}, "seeds": [42, 44]},
         "fixed": {"linear": {"*": {"lr": 0.1, "weight_decay": 0.0}}, "finetune": {"*": {"lr": 0.1, "weight_decay": 0.0}}}}


def ok_record(spec, value, trainable=1000):
    """An ok record of ``spec`` with metric ``value``, as a trial would write it."""
    return {"spec": spec, "status": "ok", "metrics": {"eval": value}, "curve": [],
            "params": {"trainable": trainable, "head": 10, "total": 5000}, "provenance": {},
            "cost": {"forward_flops": 2e9, "train_images_per_s": 100.0}}


def put(store, suite, method, task, values, trainable=1000):
    """One ok final record per seed of ``method`` on ``task`` with metric ``values`` (in seed order)."""
    cell = Cell(method, task)
    for spec, value in zip(final_specs(suite, cell, fixed_hparams(suite, cell)), values):
        store.write(ok_record(spec, value, trainable))


def complete_plan(store, suite, make_record=ok_record, seed=0):
    """Every cell of ``suite``'s plan finished as ``harness run`` leaves it: each search trial's ok record (random
    metrics), then the winner's finals. ``make_record(spec_dict, value)`` shapes a record. Returns how many were
    written."""
    import random

    from harness.plan import plan_cells, search_specs, select_best

    rng, written = random.Random(seed), 0
    for cell in plan_cells(suite.methods, suite.tasks):
        search = []
        for spec in search_specs(suite, cell):
            record = make_record(spec.to_dict(), rng.uniform(20, 90))
            store.write(dict(record, spec=spec))
            search.append(record)
        hparams = select_best(search)["spec"]["hparams"] if search else fixed_hparams(suite, cell)
        for spec in final_specs(suite, cell, hparams):
            store.write(dict(make_record(spec.to_dict(), rng.uniform(20, 90)), spec=spec))
        written += len(search) + len(suite.seeds)
    return written
