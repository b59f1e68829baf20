"""Run-directory plumbing: atomic writes, the dataset store, the manifest's stage skipping, and Tables checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grasp import _io
from grasp.data import DataError, RawDataset, preprocess
from grasp.data.store import load_dataset, save_dataset
from grasp.pipeline import Manifest, Tables, stage_key
from grasp.pipeline.stages import _run, raw_hash
from grasp.pipeline.tables import TABLE_FILES


def toy_raw(seed: int, users: int = 13, items: int = 9) -> RawDataset:
    rng = np.random.default_rng(seed)
    n = users * 6
    u = np.array([f"u{i % users}" for i in range(n)], dtype=object)
    it = np.array([f"i{j}" for j in rng.integers(0, items, n)], dtype=object)
    t = rng.integers(0, 5, n).astype(np.float64)  # many ties
    attrs = {f"i{j}": {"title": f"Item {j}", "brand": "Acme" if j % 2 else ""} for j in range(items)}
    return RawDataset("toy", u, it, t, item_attributes=attrs, user_attributes={"u1": {"age": "30"}}, domain="toy")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "a" / "file.json"
    _io.write_json(path, {"v": 1})

    def broken(f):
        f.write(b'{"v": 2')  # half a file, then a crash
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _io.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]  # no temporary left behind


def test_save_npy_roundtrip(tmp_path):
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    _io.save_npy(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)


def test_dataset_store_roundtrip(tmp_path):
    ds = preprocess(toy_raw(int(np.random.default_rng().integers(1 << 30))))
    save_dataset(ds, tmp_path)
    back = load_dataset(tmp_path)
    for name in ("name", "num_users", "num_items", "user_tokens", "item_tokens", "user_ids", "item_ids",
                 "head_fraction", "head_user_threshold", "head_item_threshold", "item_attributes",
                 "user_attributes", "filters", "domain"):  # fmt: skip
        assert getattr(back, name) == getattr(ds, name), name
    for name in ("valid_items", "test_items", "item_popularity", "user_is_head", "item_is_head"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
    for a, b in zip(back.sequences + back.train + back.timestamps, ds.sequences + ds.train + ds.timestamps,
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_dataset_store_errors(tmp_path):
    with pytest.raises(DataError, match="dataset.json: missing; run `grasp prepare`"):
        load_dataset(tmp_path)
    save_dataset(preprocess(toy_raw(1)), tmp_path)
    (tmp_path / "dataset.json").write_text('{\n  "format": 1,\n  oops')
    with pytest.raises(DataError, match=r"dataset.json:3: not valid JSON"):
        load_dataset(tmp_path)


def test_raw_hash_sees_content_only():
    a, b = toy_raw(3), toy_raw(3)
    assert raw_hash(a) == raw_hash(b)
    b.timestamps[5] += 1
    assert raw_hash(a) != raw_hash(b)
    c = toy_raw(3)
    c.item_attributes["i1"]["title"] = "changed"
    assert raw_hash(a) != raw_hash(c)


def test_manifest_skips_current_stage_and_reruns_on_change(tmp_path):
    calls = []

    def body(value):
        def run():
            calls.append(value)
            return [_io.write_text(tmp_path / "out.txt", value)], {"note": value}

        return run

    quiet = [].append
    assert _run(Manifest(tmp_path), "s", {"a": 1}, {"in": "x"}, False, quiet, body("1"))
    assert not _run(Manifest(tmp_path), "s", {"a": 1}, {"in": "x"}, False, quiet, body("1"))  # skipped
    assert _run(Manifest(tmp_path), "s", {"a": 2}, {"in": "x"}, False, quiet, body("2"))  # config changed
    assert _run(Manifest(tmp_path), "s", {"a": 2}, {"in": "y"}, False, quiet, body("3"))  # input changed
    assert _run(Manifest(tmp_path), "s", {"a": 2}, {"in": "y"}, True, quiet, body("4"))  # forced
    (tmp_path / "out.txt").write_text("tampered")
    assert _run(Manifest(tmp_path), "s", {"a": 2}, {"in": "y"}, False, quiet, body("5"))  # output changed
    (tmp_path / "out.txt").unlink()
    assert _run(Manifest(tmp_path), "s", {"a": 2}, {"in": "y"}, False, quiet, body("6"))  # output missing
    assert calls == ["1", "2", "3", "4", "5", "6"]
    entry = Manifest(tmp_path).stage("s")
    assert entry["key"] == stage_key("s", {"a": 2}, {"in": "y"}) and entry["note"] == "6"
    assert set(Manifest(tmp_path).data["versions"]) >= {"grasp", "torch", "python", "numpy"}


def test_interrupted_stage_is_not_recorded(tmp_path):
    def crash():
        _io.write_text(tmp_path / "partial.txt", "x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _run(Manifest(tmp_path), "s", {}, {}, False, [].append, crash)
    assert Manifest(tmp_path).stage("s") is None


def write_tables(folder, users=6, items=8, dim=5, k=2, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for side, n in (("user", users), ("item", items)):
        for name in (side, f"{side}_sim"):
            table = rng.standard_normal((n + 1, dim)).astype(np.float32)
            table[0] = 0
            arrays[name] = table
        ids = rng.integers(1, n + 1, (n + 1, k))
        ids[0] = 0
        arrays[f"{side}_neighbors"] = ids
    for name, array in arrays.items():
        _io.save_npy(folder / TABLE_FILES[name], array)
    return arrays


def test_tables_load(tmp_path):
    arrays = write_tables(tmp_path)
    tables = Tables.load(tmp_path, num_users=6, num_items=8)
    assert tables.dim == 5
    np.testing.assert_array_equal(tables.item_sim, arrays["item_sim"])


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("item", lambda a: a.__setitem__((3, 1), np.nan), "1 rows hold NaN or inf \\(first: row 3\\)"),
        ("user_sim", lambda a: a[:-1], "6 rows, expected 7"),
        ("item", lambda a: a.__setitem__((0, 0), 1.0), "row 0 is padding"),
        ("item_neighbors", lambda a: a.__setitem__((2, 0), 9), "neighbour ids must lie in 1..8"),
        ("user", lambda a: a[:, 0], "embeddings must be 2-d"),
    ],
)
def test_tables_errors(tmp_path, name, change, message):
    arrays = write_tables(tmp_path)
    array = arrays[name].copy()
    changed = change(array)
    _io.save_npy(tmp_path / TABLE_FILES[name], array if changed is None else changed)
    with pytest.raises(DataError, match=f"{TABLE_FILES[name]}: {message}"):
        Tables.load(tmp_path, num_users=6, num_items=8)


def test_tables_missing_file(tmp_path):
    write_tables(tmp_path)
    (tmp_path / "user_sim.npy").unlink()
    with pytest.raises(DataError, match="user_sim.npy: missing; run `grasp embed`"):
        Tables.load(tmp_path)
