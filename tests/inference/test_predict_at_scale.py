"""predict and evaluate at dataset scale: two CPU processes (``trainer=ddp_cpu``) against one,
a killed run resumed with another number of processes, batches, lists, shards and per-image
jsons.

Both processes of ``trainer=ddp_cpu`` run one torch thread each on this machine (Lightning
splits the cores); the single-process references run with one thread too, so that the float32
sums are in the same order and entities are compared exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, cli_config, run_python, write_tiny_checkpoint
from entityseg import evaluate as evaluate_cli
from entityseg import predict as predict_cli
from entityseg.data.synthetic import generate_dataset
from entityseg.evaluation.entity_ap import evaluate as entity_ap
from entityseg.inference.photos import collate_photos
from entityseg.inference.shards import (
    ShardLines,
    append_done,
    append_skipped,
    open_shard,
    read_shards,
)

#: The photo tree: nested folders, the stem ``1`` twice, two sizes, one bad photo (7 files).
GOOD = ["a/1.jpg", "a/x.jpg", "b/c/1.jpg", "b/c/z.jpg", "b/y.png", "top.jpg"]
BAD = "a/bad.jpg"


@contextmanager
def one_thread():
    """Torch on one thread, as each process of ``trainer=ddp_cpu`` runs here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(checkpoint, photo folder, folder of the uninterrupted single-process run)."""
    root = tmp_path_factory.mktemp("scale")
    checkpoint = write_tiny_checkpoint(root / "tiny.ckpt")
    generate_dataset(root / "scenes", num_images=6, seed=3, height=96, width=128)
    scenes = sorted((root / "scenes" / "images").glob("*.jpg"))
    photos = root / "photos"
    for name, scene in zip(GOOD, scenes, strict=True):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(scene)
        if name == "b/y.png":  # another size: another network input
            image = image.resize((112, 80))
        image.save(photos / name)
    (photos / BAD).write_bytes(b"not a jpeg")
    single = root / "single"
    with one_thread(), pytest.raises(SystemExit):  # exit 1: the bad photo
        predict_here(checkpoint, photos, single, "input_recursive=true")
    return checkpoint, photos, single


def predict_here(checkpoint, input, output, *overrides):
    """``python -m entityseg.predict`` in this process."""
    config = cli_config(
        "predict",
        output,
        f"ckpt_path={checkpoint}",
        f"input={input}",
        f"output={output}",
        "data.num_workers=0",
        *overrides,
    )
    predict_cli.main(config)


def predict_args(checkpoint, photos, out, *overrides):
    return [
        "-m",
        "entityseg.predict",
        f"ckpt_path={checkpoint}",
        f"input={photos}",
        "input_recursive=true",
        f"output={out}",
        f"hydra.run.dir={out}_hydra",
        "data.num_workers=0",
        *overrides,
    ]


def predictions(folder: Path) -> list[dict]:
    return json.loads((folder / "predictions.json").read_text())


def test_single_process_run_names_outputs_by_their_subfolders(tree):
    _, photos, single = tree
    results = predictions(single)
    assert [n for n in dict.fromkeys(r["file_name"] for r in results)] == sorted(
        GOOD, key=lambda n: tuple(n.split("/"))
    )
    for name in GOOD:  # a/1.jpg and b/c/1.jpg apart
        stem = name.rsplit(".", 1)[0]
        id_map = np.asarray(Image.open(single / f"{stem}_entities.png"))
        assert id_map.shape == np.asarray(Image.open(photos / name)).shape[:2]
        assert (single / f"{stem}_overlay.jpg").is_file()
    ids = {r["file_name"]: r["image_id"] for r in results}
    assert ids["a/1.jpg"] == 1 and ids["b/c/1.jpg"] == 4  # input positions (a/bad.jpg is 2)


def test_two_processes_give_each_image_once_and_the_entities_of_one(tree):
    checkpoint, photos, single = tree
    out = single.parent / "two"
    result = run_python(*predict_args(checkpoint, photos, out, "trainer=ddp_cpu"))
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert f"skipped: {photos / BAD}: not an image file" in log
    assert "6 of 7 images predicted" in log and "1 skipped" in log
    assert predictions(out) == predictions(single)  # exactly: RLEs, scores, ids, order
    shards = [read_shards_of(out, rank) for rank in (0, 1)]
    assert all(shards) and not set(shards[0]) & set(shards[1])  # disjoint shares
    assert set(shards[0]) | set(shards[1]) == {*GOOD, BAD}
    for name in GOOD:
        png = f"{name.rsplit('.', 1)[0]}_entities.png"
        assert np.array_equal(
            np.asarray(Image.open(out / png)), np.asarray(Image.open(single / png))
        )


def read_shards_of(out: Path, rank: int) -> list[str]:
    """The names one shard records, in order."""
    lines = (out / f"predictions.rank{rank}.jsonl").read_text().splitlines()[1:]
    return [json.loads(line)["file_name"] for line in lines]


def test_a_killed_rank_stops_the_run_and_one_process_resumes_it(tree):
    checkpoint, photos, single = tree
    out = single.parent / "killed"
    command = [sys.executable, *predict_args(checkpoint, photos, out, "trainer=ddp_cpu")]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    shard = out / "predictions.rank1.jsonl"
    deadline = time.monotonic() + 120
    while not (shard.is_file() and shard.read_bytes().count(b"\n") >= 2):  # one image done
        assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()[-3000:]
        time.sleep(0.01)
    os.kill(rank_one(run.pid), signal.SIGKILL)
    log = run.communicate(timeout=120)[0].decode()
    assert run.returncode != 0
    # named by Lightning's launcher, or by the run when its end-of-run barrier fails first
    assert "[rank: 1] Child process" in log or "rank 1 of 2 stopped before" in log, log[-3000:]
    assert not (out / "predictions.json").exists()
    kept = {r: read_shards_of(out, r) for r in (0, 1)}  # every whole line still reads
    assert kept[1] and len(kept[0]) + len(kept[1]) < len(GOOD) + 1

    with one_thread(), pytest.raises(SystemExit):  # one process now; the bad photo again
        predict_here(checkpoint, photos, out, "input_recursive=true")
    assert predictions(out) == predictions(single)
    names = read_shards_of(out, 0)[len(kept[0]) :]  # what the resumed run predicted
    done_before = {n for n in kept[0] + kept[1] if n != BAD}
    assert sorted(names) == sorted({*GOOD, BAD} - done_before)


def rank_one(parent: int) -> int:
    """The process of rank 1 that Lightning's launcher started under ``parent``."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in children:
        if b"LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    raise AssertionError(f"no rank 1 among {children}")


def test_a_batch_of_three_gives_the_entities_of_one_at_a_time(tree):
    """Images of one size share a forward; its float32 sums run in another order than one
    image's (the kernels block a batch of 3 otherwise), so scores agree to float32 rounding
    and the masks, ids and order exactly."""
    checkpoint, photos, single = tree
    out = single.parent / "batched"
    with one_thread(), pytest.raises(SystemExit):
        predict_here(checkpoint, photos, out, "input_recursive=true", "inference.batch_size=3")
    batched, reference = predictions(out), predictions(single)
    assert [{**r, "score": None} for r in batched] == [{**r, "score": None} for r in reference]
    scores = np.array([[b["score"], r["score"]] for b, r in zip(batched, reference, strict=True)])
    np.testing.assert_allclose(scores[:, 0], scores[:, 1], rtol=1e-6, atol=0)


def test_collate_groups_by_network_input_size_and_keeps_failures():
    def sample(index, height, width):
        return {
            "images": torch.zeros(5, 3, height, width),
            "crop_boxes": torch.zeros(5, 4),
            "image_size": (height, width),
            "orig_size": (height, width),
            "flipped": False,
            "image_id": index + 1,
            "file_name": f"{index}.jpg",
            "num_skipped": 0,
            "name": f"{index}.jpg",
            "path": f"/x/{index}.jpg",
        }

    failed = {"name": "1.jpg", "failure": "1.jpg: not an image file"}
    batch = collate_photos([sample(0, 96, 128), failed, sample(2, 64, 112), sample(3, 90, 100)])
    assert batch["failures"] == [failed]
    # 96 x 128 and 90 x 100 both go through the network as 96 x 128: one forward
    assert [g["names"] for g in batch["groups"]] == [["0.jpg", "3.jpg"], ["2.jpg"]]
    assert [tuple(g["images"].shape) for g in batch["groups"]] == [
        (2, 5, 3, 96, 128),
        (1, 5, 3, 64, 128),
    ]


def test_a_list_input_per_image_jsons_and_shards_without_merge(tree):
    checkpoint, photos, single = tree
    listed = single.parent / "list.txt"
    # absolute and relative (to the list's folder) lines, a comment and a blank line
    listed.write_text(f"# the photos\n{photos / 'b/c/1.jpg'}\n\nphotos/a/1.jpg\n")
    out = single.parent / "listed"
    with one_thread():
        predict_here(
            checkpoint,
            listed,
            out,
            "output_format=per_image",
            "save_pictures=id_map",
            "merge=false",
        )
    assert not (out / "predictions.json").exists()
    index = json.loads((out / "predictions.index.json").read_text())
    assert index["shards"] == ["predictions.rank0.jsonl"]
    assert (index["images"], index["skipped"]) == (2, 0)
    reference = predictions(single)
    for name in ("b/c/1", "a/1"):  # relative to the folder holding every listed photo
        assert (out / f"{name}_entities.png").is_file() and not (
            out / f"{name}_overlay.jpg"
        ).exists()
    sa1b = json.loads((out / "b/c/1.json").read_text())
    assert sa1b["image"] == {"image_id": 1, "width": 128, "height": 96, "file_name": "b/c/1.jpg"}
    expected = [r for r in reference if r["file_name"] == "b/c/1.jpg"]
    assert [a["segmentation"] for a in sa1b["annotations"]] == [r["segmentation"] for r in expected]
    assert [a["score"] for a in sa1b["annotations"]] == [r["score"] for r in expected]
    assert all(a["crop_box"] == [0, 0, 128, 96] for a in sa1b["annotations"])
    assert index["entities"] == sum(
        len(json.loads((out / f"{n}.json").read_text())["annotations"]) for n in ("b/c/1", "a/1")
    )


def test_evaluate_under_two_processes_scores_as_one(tree, tmp_path):
    checkpoint, _, single = tree
    scenes = single.parent / "scenes"
    gt = tmp_path / "gt.json"  # ground truth the network scores well on: its own entities
    data = [
        "data.num_workers=0",
        f"data.val_json={gt}",
        f"data.val_images={scenes / 'images'}",
        "data.val_batch_size=1",  # a batch of two differs from one in the last float32 bit
    ]
    with one_thread():
        predict_here(
            checkpoint, scenes / "images", tmp_path / "own", f"gt={scenes / 'annotations.json'}"
        )
    own = predictions(tmp_path / "own")
    coco = json.loads((scenes / "annotations.json").read_text())
    coco["annotations"] = [
        {
            "id": k,
            "image_id": r["image_id"],
            "category_id": 1,
            "segmentation": r["segmentation"],
            "area": 1.0,
            "iscrowd": 0,
        }
        for k, r in enumerate(own, start=1)
        if r["score"] >= sorted(x["score"] for x in own)[len(own) // 2]
    ]
    gt.write_text(json.dumps(coco))

    one = tmp_path / "one"
    with one_thread():
        evaluate_cli.main(cli_config("eval", one, f"ckpt_path={checkpoint}", *data))
    two = tmp_path / "two"
    result = run_python(
        "-m",
        "entityseg.evaluate",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={two}",
        "trainer=ddp_cpu",
        *data,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {p.name: json.loads((p / "table7.json").read_text()) for p in (one, two)}
    for row_one, row_two in zip(rows["one"], rows["two"], strict=True):
        assert {k: v for k, v in row_one.items() if k != "forward_ms"} == {
            k: v for k, v in row_two.items() if k != "forward_ms"
        }
        assert (one / row_one["predictions"]).read_text() == (
            two / row_two["predictions"]
        ).read_text()
    batch_oc = [r for r in rows["one"] if r["mode"] == "batch_oc"][0]
    assert batch_oc["AP"] > 30  # not a vacuous zero
    assert (
        batch_oc["AP"]
        == entity_ap(gt, json.loads((one / "predictions_batch_oc.json").read_text()))["AP"]
    )


def test_shards_latest_line_wins_and_the_counter_counts_new_lines(tmp_path):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"x")
    settings = {"checkpoint": "a"}
    lines = ShardLines(tmp_path)
    with open_shard(tmp_path, 0, settings) as zero:
        append_skipped(zero, "p.jpg", "unreadable")
    with open_shard(tmp_path, 1, settings) as one:
        append_done(one, "p.jpg", photo, 7, [])
    assert lines.total() == 2 and lines.of_rank(1) == 1  # the settings lines are not images
    record = read_shards(tmp_path, settings)["p.jpg"]
    assert record.done and record.image_id == 7
    with open_shard(tmp_path, 0, settings) as zero:
        append_skipped(zero, "p.jpg", "unreadable now")
        zero.write(b'{"file_name": "cut')  # a kill in the middle of a line
    assert read_shards(tmp_path, settings)["p.jpg"].skipped == "unreadable now"
    assert lines.total() == 3
    shutil.copy(tmp_path / "predictions.rank0.jsonl", tmp_path / "copy.txt")
    with open_shard(tmp_path, 0, settings):  # its owner cuts the half line away
        pass
    assert (tmp_path / "predictions.rank0.jsonl").read_bytes() == (
        tmp_path / "copy.txt"
    ).read_bytes().rsplit(b"\n", 1)[0] + b"\n"


def test_compare_puts_two_modes_side_by_side_with_counts_per_image_and_in_all(tree):
    from entityseg import EntitySegmenter
    from entityseg.inference.compare import compare_entities

    checkpoint, photos, single = tree
    out = single.parent / "compared"
    with one_thread():
        predict_here(
            checkpoint,
            photos / "b",
            out,
            "input_recursive=true",
            "inference.compare=[image_o,batch_oc]",
        )
        segmenter = EntitySegmenter.from_checkpoint(checkpoint, device="cpu")
        expected = {
            name: compare_entities(
                segmenter(photos / "b" / name, "batch_oc"),
                segmenter(photos / "b" / name, "image_o"),
            ).counts()
            for name in ("c/1.jpg", "c/z.jpg", "y.png")
        }
    comparison = json.loads((out / "comparison.json").read_text())
    assert (comparison["baseline"], comparison["found"]) == ("image_o", "batch_oc")
    assert comparison["images"] == expected
    assert comparison["total"] == {
        key: sum(counts[key] for counts in expected.values()) for key in expected["y.png"]
    }
    for name in expected:  # the side-by-side picture: crops, Image-O, Batch-OC
        picture = Image.open(out / f"{name.rsplit('.', 1)[0]}_compare.jpg")
        assert picture.width > 3 * Image.open(photos / "b" / name).width
    # the predictions are the mode's, as without the comparison
    reference = [r for r in predictions(single) if r["file_name"].startswith("b/")]
    assert [
        {**r, "file_name": "b/" + r["file_name"], "image_id": None} for r in predictions(out)
    ] == [{**r, "image_id": None} for r in reference]


def test_a_folder_says_how_many_photos_its_subfolders_hold(tree, caplog):
    checkpoint, photos, single = tree
    with one_thread(), caplog.at_level("WARNING", logger="entityseg"):
        predict_here(checkpoint, photos, single.parent / "top_only")  # not recursive
    assert (
        f"input={photos}: 6 image(s) in its subfolders are not included (input_recursive=true "
        "includes them)"
    ) in caplog.text
    assert [r["file_name"] for r in predictions(single.parent / "top_only")][:1] == ["top.jpg"]
