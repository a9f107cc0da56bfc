"""``harness data check`` and ``harness run``'s preflight: every defect kind, on a broken tree, gives its exact
message (file and line) and exit status (check: 0 clean, 1 problems, 2 usage error; run: refuses with 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from test_fgvc import make_fgvc_tree
from test_vtab import make_vtab_tree

RELAXED = ["--set", "data.strict_counts=false"]


def check(capsys, suite: str, root: Path | None, *extra: str) -> tuple[int, str, list[str]]:
    """Run ``harness data check``; return (exit code, stdout, the problem lines without their 'problem: ')."""
    args = ["data", "check", "--suite", suite, *(["--data-root", str(root)] if root else []), *extra]
    code = main(args)
    out = capsys.readouterr().out
    problems = [line.strip()[len("problem: "):] for line in out.splitlines() if line.strip().startswith("problem: ")]
    return code, out, problems


def refuse(capsys, suite: str, root: Path, tasks: str, *extra: str) -> tuple[int, str]:
    """A real run (not --dry-run, which lists the same problems as warnings and exits 0)."""
    code = main(["run", "--suite", suite, "--tasks", tasks, "--methods", "linear", "--data-root", str(root),
                 "--results", str(root.parent / "results"), *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def vtab(tmp_path) -> Path:
    """A clean tiny tree with vtab-dtd (labels 0/1); each test breaks one thing."""
    return make_vtab_tree(tmp_path / "vtab-1k", ["dtd"])


# ---------------------------------------------------------------------------------------------------- VTAB
def test_clean_tree_exits_0(capsys, vtab):
    code, out, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED, "--deep")
    assert (code, problems) == (0, []) and "1 task(s) checked: all clean" in out
    assert "note: vtab-dtd: " + f"{vtab}/dtd/train800.txt: 6 entries, expected 800" in out


def test_split_sizes_against_the_protocol(capsys, vtab):
    code, out, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd")
    d = vtab / "dtd"
    assert code == 1
    assert problems == [f"vtab-dtd: {d}/train800.txt: 6 entries, expected 800",
                        f"vtab-dtd: {d}/val200.txt: 4 entries, expected 200",
                        f"vtab-dtd: {d}/train800val200.txt: 10 entries, expected 1000"]
    assert "1 task(s) checked: 0 clean, 1 with problems (3 in all)" in out


def test_missing_task_folder(capsys, vtab):
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd,vtab-kitti", *RELAXED)
    assert code == 1
    assert problems == [f"vtab-kitti: folder not found: {vtab}/kitti (expected the VTAB-1k export layout: "
                        "kitti/{train800,val200,train800val200,test}.txt and kitti/images/<split>/)"]


def test_no_data_root(capsys):
    code, _, problems = check(capsys, "vtab", None, "--tasks", "vtab-dtd")
    assert code == 1
    assert problems == ["vtab-dtd: no data root: pass --data-root PATH (the folder that holds dtd/), "
                        "or set data.root or data.roots.vtab-dtd in the suite"]


def test_missing_split_file(capsys, vtab):
    (vtab / "dtd" / "val200.txt").unlink()
    code, out, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)
    assert code == 1 and problems == [f"vtab-dtd: {vtab}/dtd/val200.txt: split file not found"]
    assert "missing" in next(line for line in out.splitlines() if line.strip().startswith("val200"))


def test_malformed_lines(capsys, vtab):
    path = vtab / "dtd" / "test.txt"
    lines = path.read_text().splitlines()
    lines[2] = "images/test/000002.jpg"
    lines[4] = "images/test/000004.jpg one"
    path.write_text("\n".join(lines) + "\n")
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)
    hint = "(expected '<image path> <integer label>', e.g. 'images/train800/000000.jpg 3')"
    assert code == 1
    assert problems == [f"vtab-dtd: {path}:3: malformed line 'images/test/000002.jpg' {hint}",
                        f"vtab-dtd: {path}:5: malformed line 'images/test/000004.jpg one' {hint}"]


def test_many_malformed_lines_are_capped(capsys, vtab):
    path = vtab / "dtd" / "test.txt"
    path.write_text("".join(f"images/test/{i:06d}.jpg,{i % 2}\n" for i in range(6)) + "\n" * 2)
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)
    assert code == 1 and len(problems) == 6
    assert problems[0].startswith(f"vtab-dtd: {path}:1: malformed line 'images/test/000000.jpg,0'")
    assert problems[-1] == f"vtab-dtd: {path}: 1 more malformed lines"


def test_labels_outside_the_classes(capsys, vtab):
    path = vtab / "dtd" / "train800.txt"
    lines = path.read_text().splitlines()
    lines[1] = "images/train800/000001.jpg 47"
    lines[3] = "images/train800/000003.jpg -1"
    path.write_text("\n".join(lines) + "\n")
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)
    assert code == 1
    assert problems == [f"vtab-dtd: {path}:2: label 47 outside [0, 47)",
                        f"vtab-dtd: {path}:4: label -1 outside [0, 47)"]


def test_listed_images_absent(capsys, vtab):
    (vtab / "dtd" / "images" / "val200" / "000003.jpg").unlink()
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)
    assert code == 1
    assert problems == [f"vtab-dtd: {vtab}/dtd/val200.txt:4: image not found: {vtab}/dtd/images/val200/000003.jpg"]


def test_image_folder_absent(capsys, vtab):
    shutil.rmtree(vtab / "dtd" / "images" / "test")
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)
    assert code == 1
    assert problems == [f"vtab-dtd: {vtab}/dtd/test.txt:1: folder not found: {vtab}/dtd/images/test "
                        "(6 listed image(s) are in it)"]


def test_duplicate_entries(capsys, vtab):
    path = vtab / "dtd" / "val200.txt"
    path.write_text(path.read_text() + "images/val200/000001.jpg 1\n")
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)
    assert code == 1
    assert problems == [f"vtab-dtd: {path}:5: duplicate entry 'images/val200/000001.jpg' (first at line 2)"]


def test_images_that_fail_to_decode_only_with_deep(capsys, vtab):
    bad = vtab / "dtd" / "images" / "test" / "000002.jpg"
    bad.write_bytes(b"not a jpeg")
    truncated = vtab / "dtd" / "images" / "test" / "000004.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED)[0] == 0  # cheap check: files exist
    code, _, problems = check(capsys, "vtab", vtab, "--tasks", "vtab-dtd", *RELAXED, "--deep", "--sample", "0")
    assert code == 1
    assert len(problems) == 2
    assert problems[0] == f"vtab-dtd: {vtab}/dtd/test.txt:3: cannot decode {bad}: cannot identify image file '{bad}'"
    # the decoder's own words follow (PIL's wording for a truncated file varies between versions)
    assert problems[1].startswith(f"vtab-dtd: {vtab}/dtd/test.txt:5: cannot decode {truncated}: ")


def test_run_refuses_with_the_same_messages(capsys, vtab):
    (vtab / "dtd" / "val200.txt").unlink()
    code, err = refuse(capsys, "vtab", vtab, "vtab-dtd,vtab-kitti", *RELAXED)
    assert code == 2
    assert err.splitlines() == [
        "harness: error: the data is not ready:",
        f"  vtab-dtd: {vtab}/dtd/val200.txt: split file not found",
        f"  vtab-kitti: folder not found: {vtab}/kitti (expected the VTAB-1k export layout: "
        "kitti/{train800,val200,train800val200,test}.txt and kitti/images/<split>/)"]
    assert check(capsys, "vtab", vtab, "--tasks", "vtab-dtd,vtab-kitti", *RELAXED)[2] == [
        line.strip() for line in err.splitlines()[1:]]


def test_usage_errors_exit_2(capsys, vtab):
    assert main(["data", "check", "--suite", "vtab", "--data-root", str(vtab), "--tasks", "vtab-dtdd"]) == 2
    assert "harness: error: unknown task 'vtab-dtdd'; did you mean: vtab-dtd," in capsys.readouterr().err
    assert main(["data", "check", "--suite", "vtabb", "--data-root", str(vtab)]) == 2


def test_task_lists_and_defaults(capsys, tmp_path):
    root = make_vtab_tree(tmp_path, ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"])
    code, out, _ = check(capsys, "vtab", root, "--tasks", "vtab-specialized", *RELAXED)
    assert code == 0 and "4 task(s) checked: all clean" in out
    code, out, _ = check(capsys, "vtab", root, *RELAXED)  # the suite's 19 tasks: 15 folders are missing
    assert code == 1 and "19 task(s) checked: 4 clean, 15 with problems (15 in all)" in out


# ---------------------------------------------------------------------------------------------------- FGVC
@pytest.fixture
def fgvc(tmp_path) -> Path:
    """Stanford Dogs (images under Images/) with three classes, JSON one entry per line."""
    return make_fgvc_tree(tmp_path / "fgvc", ("fgvc-dogs",), indent=1)


def test_fgvc_clean_and_class_count(capsys, fgvc):
    code, out, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs", *RELAXED, "--deep")
    assert (code, problems) == (0, [])
    assert "1 task(s) checked: all clean" in out
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs")
    assert code == 1
    assert problems == [f"fgvc-dogs: {fgvc}/Stanford-dogs: 3 distinct class ids in train.json, val.json, test.json, "
                        "expected 120"]


def test_fgvc_too_many_classes_always_a_problem(capsys, tmp_path):
    root = make_fgvc_tree(tmp_path, ("fgvc-cars",), class_ids=tuple(range(197)),
                          per_split={"train": 1, "val": 0, "test": 0})
    for split in ("val", "test"):
        (root / "Stanford-cars" / f"{split}.json").write_text('{"car_ims/000000.jpg": 0}')
    code, _, problems = check(capsys, "fgvc", root, "--tasks", "fgvc-cars", *RELAXED)
    assert code == 1
    assert problems == [f"fgvc-cars: {root}/Stanford-cars: 197 distinct class ids in train.json, val.json, "
                        "test.json, expected 196 (labels would fall outside [0, 196))"]


def test_fgvc_missing_dataset_folder_and_split_file(capsys, fgvc):
    (fgvc / "Stanford-dogs" / "val.json").unlink()
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs,fgvc-cub", *RELAXED)
    assert code == 1
    assert problems == [
        f"fgvc-dogs: {fgvc}/Stanford-dogs/val.json: split file not found",
        f"fgvc-cub: folder not found: {fgvc}/CUB_200_2011 (expected VPT's FGVC layout: "
        "CUB_200_2011/{train,val,test}.json and the images at CUB_200_2011/images/<key>)"]


def test_fgvc_invalid_json(capsys, fgvc):
    path = fgvc / "Stanford-dogs" / "train.json"
    path.write_text(path.read_text().replace(",\n", "\n", 1))
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs", *RELAXED)
    assert code == 1
    assert problems == [f"fgvc-dogs: {path}:3: not valid JSON: Expecting ',' delimiter (column 2)"]


def test_fgvc_not_a_mapping(capsys, fgvc):
    path = fgvc / "Stanford-dogs" / "test.json"
    path.write_text(json.dumps([["a.jpg", 1]]))
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs", *RELAXED)
    assert code == 1
    assert problems == [f"fgvc-dogs: {path}: expected a JSON object mapping image path -> class id, got list"]


def test_fgvc_malformed_entries(capsys, fgvc):
    path = fgvc / "Stanford-dogs" / "val.json"
    entries = json.loads(path.read_text())
    first, second = list(entries)[:2]
    entries[first], entries[second] = "1", 2.5
    path.write_text(json.dumps(entries, indent=1))
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs", *RELAXED)
    hint = '(expected "<image path>": <integer class id>)'
    assert code == 1
    assert problems == [f'fgvc-dogs: {path}:2: malformed entry "{first}": "1" {hint}',
                        f'fgvc-dogs: {path}:3: malformed entry "{second}": 2.5 {hint}']


def test_fgvc_duplicate_keys(capsys, fgvc):
    path = fgvc / "Stanford-dogs" / "test.json"
    lines = path.read_text().splitlines()
    lines.insert(-1, lines[1].rstrip(",") + ",")  # the first entry again, as the second-to-last line
    if not lines[-3].endswith(","):
        lines[-3] += ","
    path.write_text("\n".join(lines).replace(",\n}", "\n}"))
    key = lines[1].split('"')[1]
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs", *RELAXED)
    assert code == 1
    assert problems == [f"fgvc-dogs: {path}:{len(lines) - 1}: duplicate entry '{key}' (first at line 2)"]


def test_fgvc_images_absent_under_the_dataset_image_root(capsys, fgvc):
    entries = json.loads((fgvc / "Stanford-dogs" / "train.json").read_text())
    key = list(entries)[4]
    (fgvc / "Stanford-dogs" / "Images" / key).unlink()
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs", *RELAXED)
    assert code == 1
    assert problems == [f"fgvc-dogs: {fgvc}/Stanford-dogs/train.json:6: image not found: "
                        f"{fgvc}/Stanford-dogs/Images/{key}"]


def test_fgvc_eval_classes_never_trained_on(capsys, fgvc):
    path = fgvc / "Stanford-dogs" / "train.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if v != 2}, indent=1))
    code, _, problems = check(capsys, "fgvc", fgvc, "--tasks", "fgvc-dogs", "--set",
                              "data.roots={fgvc-dogs: " + str(fgvc / "Stanford-dogs") + "}")
    assert code == 1
    d = fgvc / "Stanford-dogs"
    assert problems == [f"fgvc-dogs: {d}: 3 distinct class ids in train.json, val.json, test.json, expected 120",
                        f"fgvc-dogs: {d}/val.json: 1 class id(s) not in train.json: 2",
                        f"fgvc-dogs: {d}/test.json: 1 class id(s) not in train.json: 2"]


def test_fgvc_run_refuses(capsys, fgvc):
    (fgvc / "Stanford-dogs" / "test.json").write_text("{")
    code, err = refuse(capsys, "fgvc-search", fgvc, "fgvc-dogs", *RELAXED)
    assert code == 2
    assert err.splitlines() == ["harness: error: the data is not ready:",
                                f"  fgvc-dogs: {fgvc}/Stanford-dogs/test.json:1: not valid JSON: Expecting property "
                                "name enclosed in double quotes (column 2)"]


def test_many_missing_image_folders_are_capped(capsys, tmp_path):
    root = make_fgvc_tree(tmp_path, ("fgvc-cub",), class_ids=tuple(range(8)), per_split={"train": 1, "val": 1,
                                                                                        "test": 1})
    shutil.rmtree(root / "CUB_200_2011" / "images")
    code, _, problems = check(capsys, "fgvc", root, "--tasks", "fgvc-cub", *RELAXED)
    train = root / "CUB_200_2011" / "train.json"
    assert code == 1 and len(problems) == 3 * 6
    assert problems[0] == (f"fgvc-cub: {train}:1: folder not found: {root}/CUB_200_2011/images/001.Bird_0 "
                           "(1 listed image(s) are in it)")
    assert problems[5] == f"fgvc-cub: {train}: 3 more image folders not found"
