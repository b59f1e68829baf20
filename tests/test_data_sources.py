"""The remaining dataset sources of grasp.data: Amazon dumps, generic tables, synthetic data, download, dispatch."""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import hashlib
import http.server
import io
import json
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from grasp.data import (
    DATASETS,
    DataError,
    DownloadError,
    add_dataset_arguments,
    fetch_movielens,
    load_amazon,
    load_raw,
    load_table,
    preprocess,
    raw_from_args,
    synthetic,
)
from grasp.data import download as download_module
from grasp.data import sources as sources_module
from grasp.data.amazon import amazon_category

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared datasets not found at {SHARED}")


def write(folder: Path, name: str, text: str | bytes, compress: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    path = folder / name
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def expect(match: str, load, *args, **kwargs) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        load(*args, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------ Amazon

REVIEWS_2014 = (
    '{"reviewerID": "U1", "asin": "A1", "reviewerName": "x", "overall": 5.0, "unixReviewTime": 1389052800}\n'
    '{"reviewerID": "U1", "asin": "A2", "overall": 3.0, "unixReviewTime": 1388966400}\n'
    "\n"
    '{"reviewerID": "U2", "asin": "A1", "overall": 4.0, "unixReviewTime": "1400000000"}\n'
)
META_2014 = (
    "{'asin': 'A1', 'title': 'Red &amp; Blue <b>Pen</b>  Set', 'price': 3.5, 'brand': '', "
    "'categories': [['Office Products', 'Pens'], ['Office Products', 'Writing', 'Pens']], "
    "'description': '<p>A smooth\\n pen.</p>', 'related': {'also_bought': ['A2']}, 'salesRank': {'Office': 9}}\n"
    "{'asin': 'A2', 'imUrl': 'http://x/y.jpg', 'categories': [[]], 'description': None}\n"
    "{'asin': 'A9', 'title': 'never reviewed'}\n"
)


def test_amazon_2014_python_literal_meta(tmp_path):
    reviews = write(tmp_path, "reviews_Office_Products_5.json", REVIEWS_2014)
    meta = write(tmp_path, "meta_Office_Products.json.gz", META_2014, compress=True)
    data = load_amazon(reviews, meta)
    assert data.name == "amazon-office-products-5" and data.domain == "office product"
    assert list(data.users) == ["U1", "U1", "U2"] and list(data.items) == ["A1", "A2", "A1"]
    assert data.timestamps.tolist() == [1389052800.0, 1388966400.0, 1400000000.0]
    assert data.item_attributes == {
        "A1": {"title": "Red & Blue Pen Set", "price": "$3.50", "categories": "Office Products, Pens, Writing",
               "description": "A smooth pen."},
        "A2": {},
    }  # fmt: skip
    assert data.user_attributes == {}
    assert "None" not in json.dumps(data.item_attributes)
    assert load_amazon(reviews).item_attributes == {}


def test_amazon_2018_json_gz(tmp_path):
    rows = [
        {"overall": 5.0, "vote": "2", "verified": True, "reviewTime": "01 1, 2018", "reviewerID": "R1",
         "asin": "B1", "style": {"Color:": " Black"}, "reviewText": "ok", "unixReviewTime": 1514764800},
        {"reviewerID": "R2", "asin": "B2", "unixReviewTime": 1514851200.0, "image": ["http://img"]},
    ]  # fmt: skip
    reviews = write(tmp_path, "Office_Products.json.gz", "\n".join(json.dumps(r) for r in rows), compress=True)
    metas = [
        {"asin": "B1", "title": "Stapler", "brand": "Acme", "price": "$12.99", "feature": ["Heavy duty", "Red"],
         "category": ["Office Products", "Office &amp; School Supplies", "</span></span>"],
         "description": ["<b>Staples</b> 20 sheets.", "", "Jam-free."], "rank": "1 in Office"},
        {"asin": "B1", "title": "duplicate entry, ignored"},
        {"asin": "B2", "title": "Ruler", "price": ".a-box-inner{background-color:#fff;}", "feature": [],
         "description": [], "brand": "  "},
    ]  # fmt: skip
    meta = write(tmp_path, "meta_Office_Products.json.gz", "\n".join(json.dumps(m) for m in metas), compress=True)
    data = load_amazon(reviews, meta, name="office", domain="stationery")
    assert data.name == "office" and data.domain == "stationery" and len(data) == 2
    assert data.item_attributes["B1"] == {
        "title": "Stapler", "brand": "Acme", "price": "$12.99",
        "categories": "Office Products, Office & School Supplies", "features": "Heavy duty; Red",
        "description": "Staples 20 sheets. Jam-free.",
    }  # fmt: skip
    assert data.item_attributes["B2"] == {"title": "Ruler"}
    assert load_amazon(reviews).domain == "office product"


@pytest.mark.parametrize(
    "file, category, domain",
    [
        ("reviews_Office_Products_5.json.gz", "Office_Products", "office product"),
        ("Office_Products_5.json", "Office_Products", "office product"),
        ("meta_Pet_Supplies.json.gz", "Pet_Supplies", "pet supply"),
        ("Books.json.gz", "Books", "book"),
        ("reviews_Electronics_5.json.gz", "Electronics", "electronics"),
        ("Cell_Phones_and_Accessories_5.json.gz", "Cell_Phones_and_Accessories", "cell phones and accessories"),
    ],
)
def test_amazon_names(tmp_path, file, category, domain):
    assert amazon_category(file) == category
    reviews = write(tmp_path, file, '{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n', file.endswith(".gz"))
    assert load_amazon(reviews).domain == domain


def test_amazon_rejects_code_in_python_literals(tmp_path):
    reviews = write(tmp_path, "reviews_Toys_5.json", '{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n')
    marker = tmp_path / "pwned"
    meta = write(tmp_path, "meta_Toys.json", f"{{'asin': 'a'}}\n__import__('os').system('touch {marker}')\n")
    error = expect(r"meta_Toys\.json:2: not a JSON object or Python dict literal", load_amazon, reviews, meta)
    assert error.line == 2 and not marker.exists()
    write(tmp_path, "meta_Toys.json", "{'asin': 'a', 'title': open('/etc/passwd').read()}\n")
    expect(r"meta_Toys\.json:1: not a JSON object", load_amazon, reviews, meta)
    write(tmp_path, "meta_Toys.json", "{'title': 'no asin'}\n")
    expect(r"meta_Toys\.json:1: missing key asin", load_amazon, reviews, meta)


def test_amazon_errors(tmp_path):
    good = '{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n'
    cases = [
        (good + '{"reviewerID": "u", "asin": "b", unixReviewTime: 2}\n', r"r\.json:2: not a JSON object"),
        (good + '["u", "a", 1]\n', r"r\.json:2: expected an object, got list"),
        (good + '{"reviewerID": "u", "unixReviewTime": 2}\n', r"r\.json:2: missing key\(s\) asin"),
        ('{"asin": "a"}\n', r"r\.json:1: missing key\(s\) reviewerID, unixReviewTime"),
        (good + '{"reviewerID": "u", "asin": "b", "unixReviewTime": "yesterday"}\n',
         r"r\.json:2: non-numeric unixReviewTime 'yesterday'"),
        ('{"reviewerID": "u", "asin": "b", "unixReviewTime": null}\n', r"r\.json:1: non-numeric unixReviewTime None"),
        ('{"reviewerID": "", "asin": "b", "unixReviewTime": 1}\n', r"r\.json:1: reviewerID must be a non-empty"),
        ("\n  \n", r"r\.json: file is empty"),
        (good.encode() + b'{"reviewerID": "caf\xe9"}\n', r"r\.json:2: invalid utf-8 byte 0xe9 at byte offset 73"),
    ]  # fmt: skip
    for text, match in cases:
        expect(match, load_amazon, write(tmp_path, "r.json", text))
    expect(r"r\.json\.gz: file is empty", load_amazon, write(tmp_path, "r.json.gz", "", compress=True))
    truncated = gzip.compress((good * 2000).encode())[:-200]
    expect(r"r\.json\.gz:\d+: cannot read gzip data", load_amazon, write(tmp_path, "r.json.gz", truncated))
    expect(r"missing\.json: file not found", load_amazon, tmp_path / "missing.json")
    reviews = write(tmp_path, "r.json", good)
    expect(r"m\.json: file is empty", load_amazon, reviews, write(tmp_path, "m.json", ""))


# ------------------------------------------------------------------------------------------ generic tables


def test_csv_with_item_and_user_tables(tmp_path):
    log = (
        'uid,iid,when,rating\nu1,i1,2014-03-01T00:00:00Z,5\nu1,"i,2",2014-03-01,4\n\n'
        "u2,i1,1393632001.5,3\nu2,i3,2014-03-01T01:00:00+01:00,1\n"
    )
    inter = write(tmp_path, "log.csv", log)
    items = write(tmp_path, "items.csv", 'iid,title,genre,price\ni1,"Pen, red",stationery,1.5\n"i,2",Ink,,\n')
    users = write(tmp_path, "users.csv", "age,uid\n30,u1\n,u2\n")
    data = load_table(inter, user="uid", item="iid", time="when", item_path=items, user_path=users, domain="pen")
    assert data.name == "log" and data.domain == "pen"
    assert list(data.users) == ["u1", "u1", "u2", "u2"] and list(data.items) == ["i1", "i,2", "i1", "i3"]
    assert data.timestamps.tolist() == [1393632000.0, 1393632000.0, 1393632001.5, 1393632000.0]
    assert data.item_attributes == {
        "i1": {"title": "Pen, red", "genre": "stationery", "price": "1.5"}, "i,2": {"title": "Ink"}
    }  # fmt: skip
    assert data.user_attributes == {"u1": {"age": "30"}, "u2": {}}
    chosen = load_table(inter, user="uid", item="iid", time=None, item_path=items, item_text=["title"], name="x")
    assert chosen.item_attributes == {"i1": {"title": "Pen, red"}, "i,2": {"title": "Ink"}}
    assert chosen.timestamps.tolist() == [0.0, 1.0, 2.0, 3.0] and chosen.name == "x"


def test_tsv_and_custom_separators(tmp_path):
    tsv = write(tmp_path, "a.tsv", "user\titem\tts\n1\t10\t5\n2\t20\t6\n")
    assert load_table(tsv, user="user", item="item", time="ts").timestamps.tolist() == [5.0, 6.0]
    dat = write(tmp_path, "ratings.dat", "u::i::t\n1::10::100\n1::11::101\n")
    with pytest.raises(ValueError, match=r"cannot tell the format of .*ratings\.dat .* pass sep="):
        load_table(dat, user="u", item="i", time="t")
    data = load_table(dat, user="u", item="i", time="t", sep="::")
    assert list(data.items) == ["10", "11"]
    semi = write(tmp_path, "b.csv", "u;i;t\n1;2;3\n")
    assert list(load_table(semi, user="u", item="i", time="t", sep=";").items) == ["2"]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from datetime import datetime, timezone

    stamps = [datetime(2020, 1, 1, tzinfo=timezone.utc), datetime(2020, 1, 2, tzinfo=timezone.utc)]
    table = pa.table({"user": [7, 8], "item": ["a", "b"], "when": pa.array(stamps, pa.timestamp("s", tz="UTC"))})
    pq.write_table(table, tmp_path / "log.parquet")
    pq.write_table(pa.table({"item": ["a", "b"], "title": ["A", None], "price": [1.0, float("nan")]}),
                   tmp_path / "items.parquet")  # fmt: skip
    data = load_table(tmp_path / "log.parquet", user="user", item="item", time="when",
                      item_path=tmp_path / "items.parquet")  # fmt: skip
    assert list(data.users) == ["7", "8"] and data.timestamps.tolist() == [1577836800.0, 1577923200.0]
    assert data.item_attributes == {"a": {"title": "A", "price": "1"}, "b": {}}
    expect(r"log\.parquet: missing column\(s\) time \(header has user, item, when\)", load_table,
           tmp_path / "log.parquet", user="user", item="item", time="time")  # fmt: skip
    pq.write_table(pa.table({"user": [1], "item": [2], "t": ["soon"]}), tmp_path / "bad.pq")
    expect(r"bad\.pq: row 1: non-numeric t 'soon'", load_table, tmp_path / "bad.pq", user="user", item="item", time="t")
    write(tmp_path, "junk.parquet", "not parquet")
    expect(r"junk\.parquet: cannot read Parquet file", load_table, tmp_path / "junk.parquet", user="u", item="i",
           time=None)  # fmt: skip


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    write(tmp_path, "log.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"log\.parquet needs pyarrow: pip install pyarrow"):
        load_table(tmp_path / "log.parquet", user="u", item="i", time="t")


def test_table_errors(tmp_path):
    def load(text: str | bytes, name: str = "t.csv", **kwargs):
        return load_table(write(tmp_path, name, text), **{"user": "u", "item": "i", "time": "t", **kwargs})

    expect(r"nope\.csv: file not found", load_table, tmp_path / "nope.csv", user="u", item="i", time="t")
    expect(r"t\.csv:1: missing column\(s\) t \(header has u, i, time\)", load, "u,i,time\n1,2,3\n")
    expect(r"t\.csv:1: duplicate header column\(s\) u", load, "u,i,t,u\n1,2,3,4\n")
    expect(
        r"t\.csv:3: non-numeric t 'yesterday' \(not an ISO-8601 date either\)", load, "u,i,t\n1,2,3\n1,3,yesterday\n"
    )
    expect(r"t\.csv:2: t 'inf' is not a finite number", load, "u,i,t\n1,2,inf\n")
    expect(r"t\.csv: file is empty", load, "")
    expect(r"t\.csv: no rows after the header", load, "u,i,t\n\n")
    expect(r"t\.csv:3: invalid utf-8 byte 0xff at byte offset 12", load, b"u,i,t\n1,2,3\n\xff,2,3\n")
    expect(r"t\.csv:2: expected 3 ','-separated fields, got 2", load, "u,i,t\n1,2\n")
    expect(r"t\.csv:3: empty i value", load, "u,i,t\n1,2,3\n1, ,3\n")
    items = write(tmp_path, "items.csv", "i,title\na,A\nb,B\na,C\n")
    expect(r"items\.csv:4: duplicate i 'a' \(first on line 2\)", load, "u,i,t\n1,a,3\n", item_path=items)
    expect(r"items\.csv:1: missing column\(s\) id", load, "u,i,t\n1,a,3\n", item_path=items, item_key="id")
    expect(r"items\.csv:1: missing column\(s\) text", load, "u,i,t\n1,a,3\n", item_path=items, item_text=["text"])


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic():
    a, b, c = synthetic(num_users=300, num_items=200, seed=5), synthetic(num_users=300, num_items=200, seed=5), \
        synthetic(num_users=300, num_items=200, seed=6)  # fmt: skip
    for field in ("users", "items", "timestamps"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert a.item_attributes == b.item_attributes and a.user_attributes == b.user_attributes
    assert not (len(a) == len(c) and np.array_equal(a.items, c.items))


#: sha256 of ``synthetic(seed=0)``'s interactions and texts (see _synthetic_digest): the quick start's data.
SYNTHETIC_SEED0_SHA256 = "3da168e46a489934df02cd92e9985075d3658f2d995f94a45fb8230300e1315f"


def _synthetic_digest(raw) -> str:
    digest = hashlib.sha256()
    interactions = [raw.name, raw.domain, list(raw.users), list(raw.items), raw.timestamps.tolist()]
    digest.update(json.dumps(interactions).encode())
    digest.update(json.dumps([raw.item_attributes, raw.user_attributes], sort_keys=True).encode())
    return digest.hexdigest()


def test_synthetic_seed0_is_pinned_and_its_tables_ship_as_package_data():
    from importlib import resources

    from grasp.data.synthetic import SYNTHETIC_TOPICS, TABLES_FILE

    tables = json.loads(resources.files("grasp.data").joinpath(TABLES_FILE).read_text(encoding="utf-8"))
    assert len(tables["topics"]) == SYNTHETIC_TOPICS == 16
    assert _synthetic_digest(synthetic(seed=0)) == SYNTHETIC_SEED0_SHA256


def test_synthetic_sanity_and_signal():
    start = time.perf_counter()
    raw = synthetic()
    assert time.perf_counter() - start < 5.0  # about 0.2 s on one core
    assert raw.domain == "product" and raw.name == "synthetic"
    data = preprocess(raw)
    assert data.num_users == 2000 and data.num_items >= 900 and 20_000 <= data.num_interactions <= 40_000
    assert all(len(s) >= 3 and len(set(s.tolist())) == len(s) for s in data.sequences[1:])
    for attributes in data.item_attributes.values():
        assert set(attributes) == {"title", "brand", "price", "categories", "description"}
        assert all(value and value != "None" for value in attributes.values())
    assert all(set(a) == {"age", "gender", "occupation"} for a in data.user_attributes.values())
    # Next-item prediction is learnable: last-item transitions beat popularity by far (HR@10, full ranking).
    transitions = collections.defaultdict(collections.Counter)
    popularity = collections.Counter()
    for u in range(1, data.num_users + 1):
        history = [*data.train[u].tolist(), int(data.valid_items[u])]
        popularity.update(history)
        for a, b in zip(history, history[1:], strict=False):
            transitions[a][b] += 1
    top = {i for i, _ in popularity.most_common(10)}
    pop_hits = sum(int(data.test_items[u]) in top for u in range(1, data.num_users + 1))
    markov_hits = sum(
        int(data.test_items[u]) in {i for i, _ in transitions[int(data.valid_items[u])].most_common(10)}
        for u in range(1, data.num_users + 1)
    )
    assert markov_hits > 3 * pop_hits and markov_hits > 0.2 * data.num_users
    # Item text carries the latent topic: the item whose description after "made for" (no title or brand words)
    # is most similar (Jaccard over words) is nearly always in the same top-level category.
    tokens = list(raw.item_attributes)
    bags = [set(raw.item_attributes[t]["description"].split("made for ")[1].lower().split()) for t in tokens]
    vocabulary = {word: k for k, word in enumerate(set().union(*bags))}
    onehot = np.zeros((len(tokens), len(vocabulary)))
    for row, bag in enumerate(bags):
        onehot[row, [vocabulary[w] for w in bag]] = 1
    shared = onehot @ onehot.T
    sizes = onehot.sum(1)
    jaccard = shared / (sizes[:, None] + sizes[None, :] - shared)
    np.fill_diagonal(jaccard, -1)
    labels = np.array([raw.item_attributes[t]["categories"].split(",")[0] for t in tokens])
    assert (labels[jaccard.argmax(1)] == labels).mean() > 0.9


def test_synthetic_arguments():
    small = synthetic(num_users=5, num_items=12, num_topics=3, mean_length=3, seed=1)
    assert len(small) == 15 and len(set(small.items)) <= 12
    for kwargs, match in [
        ({"num_users": 0}, "num_users must be >= 1, got 0"),
        ({"num_items": 10, "num_topics": 3}, r"num_items must be >= 4 \* num_topics = 12, got 10"),
        ({"num_topics": 99}, r"num_topics must be in 1\.\.\d+, got 99"),
        ({"mean_length": 2}, "mean_length must be >= 3"),
        ({"follow_series": 1.5}, r"follow_series must be in \[0, 1\], got 1.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            synthetic(**kwargs)


# ------------------------------------------------------------------------------------------ download


def ml100k_zip(tmp_path: Path, extra: dict[str, str] | None = None) -> bytes:
    files = {
        "ml-100k/u.data": "1\t10\t5\t300\n1\t20\t3\t100\n1\t30\t3\t200\n",
        "ml-100k/u.item": "10|A (1990)|||u|0|1\n20|B (1991)|||u|1|0\n30|C (1992)|||u|0|1\n",
        "ml-100k/u.genre": "unknown|0\nDrama|1\n",
        **(extra or {}),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, text in files.items():
            bundle.writestr(name, text)
    return buffer.getvalue()


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802  (http.server's naming)
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server over tmp_path/www; yields (base url, www folder, list of requested paths)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www, handler.requests
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    port = httpd.server_address[1]
    httpd.server_close()
    return f"http://127.0.0.1:{port}"


def test_download_verify_extract_and_reuse(tmp_path, server, monkeypatch):
    url, www, requests = server
    archive = ml100k_zip(tmp_path)
    (www / "ml-100k.zip").write_bytes(archive)
    monkeypatch.setitem(download_module.MOVIELENS_SHA256, "ml-100k", hashlib.sha256(archive).hexdigest())
    cache = tmp_path / "cache"
    folder = fetch_movielens("ml-100k", cache, base_url=url, progress=False)
    assert folder == cache / "movielens" / "ml-100k" and (folder / "u.data").is_file()
    assert requests == ["/ml-100k.zip"]
    assert sorted(p.name for p in (cache / "movielens").iterdir()) == ["ml-100k", "ml-100k.zip"]  # no temporaries
    # A verified cache is used without the network.
    assert fetch_movielens("ml-100k", cache, base_url=closed_port_url(), progress=False) == folder
    # Without the extracted folder, the cached archive is re-verified and extracted, still offline.
    import shutil

    shutil.rmtree(folder)
    assert (fetch_movielens("ml-100k", cache, base_url=closed_port_url(), progress=False) / "u.item").is_file()
    assert len(requests) == 1
    # The default cache is $GRASP_CACHE.
    monkeypatch.setenv("GRASP_CACHE", str(tmp_path / "env-cache"))
    assert fetch_movielens("ml-100k", base_url=url, progress=True).parent.parent == tmp_path / "env-cache"
    # Through the dispatcher (download allowed, no data_dir).
    monkeypatch.setattr(sources_module, "fetch_movielens", functools.partial(fetch_movielens, base_url=url))
    raw = load_raw("ml-100k")
    assert raw.name == "ml-100k" and len(raw) == 3 and raw.item_attributes["10"]["genres"] == "Drama"


def test_download_checksum_mismatch(tmp_path, server, monkeypatch):
    url, www, _ = server
    (www / "ml-1m.zip").write_bytes(ml100k_zip(tmp_path))
    monkeypatch.setitem(download_module.MOVIELENS_SHA256, "ml-1m", "0" * 64)
    cache = tmp_path / "cache"
    error = expect(r"ml-1m\.zip: sha256 mismatch for .*/ml-1m\.zip: expected 0{64}, got [0-9a-f]{64}; the download "
                   "was discarded", fetch_movielens, "ml-1m", cache, base_url=url, progress=False)  # fmt: skip
    assert error.path.endswith("ml-1m.zip")
    assert list((cache / "movielens").iterdir()) == []
    # A corrupt cached archive is replaced by a fresh download.
    good = ml100k_zip(tmp_path)
    monkeypatch.setitem(download_module.MOVIELENS_SHA256, "ml-1m", hashlib.sha256(good).hexdigest())
    (cache / "movielens" / "ml-1m.zip").write_bytes(b"partial")
    assert (fetch_movielens("ml-1m", cache, base_url=url, progress=False) / "u.data").is_file()


def test_download_failures(tmp_path, server, monkeypatch):
    url, www, _ = server
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:\d+/ml-100k\.zip: .*pass "
                                            r"--data-dir"):  # fmt: skip
        fetch_movielens("ml-100k", tmp_path / "c", base_url=closed_port_url(), progress=False)
    with pytest.raises(DownloadError, match=r"(?i)ml-100k\.zip: .*not found"):
        fetch_movielens("ml-100k", tmp_path / "c", base_url=url, progress=False)
    assert list((tmp_path / "c" / "movielens").iterdir()) == []
    with pytest.raises(ValueError, match=r"name must be one of ml-100k, ml-1m, got 'ml-20m'"):
        fetch_movielens("ml-20m", tmp_path)
    monkeypatch.setitem(download_module.MOVIELENS_SHA256, "ml-1m", None)
    with pytest.raises(ValueError, match="no pinned sha256 for ml-1m"):
        fetch_movielens("ml-1m", tmp_path)
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as bundle:
        bundle.writestr("../evil.txt", "x")
    (www / "ml-100k.zip").write_bytes(evil.getvalue())
    monkeypatch.setitem(download_module.MOVIELENS_SHA256, "ml-100k", hashlib.sha256(evil.getvalue()).hexdigest())
    expect(r"ml-100k\.zip: unsafe path '\.\./evil\.txt'", fetch_movielens, "ml-100k", tmp_path / "c", base_url=url,
           progress=False)  # fmt: skip
    assert not (tmp_path / "c" / "evil.txt").exists() and not (tmp_path / "c" / "movielens" / "ml-100k").exists()


def test_pinned_checksums():
    assert set(download_module.MOVIELENS_SHA256) == {"ml-100k", "ml-1m"}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in download_module.MOVIELENS_SHA256.values())


# ------------------------------------------------------------------------------------------ dispatch


def ml_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-100k"
    write(folder, "u.data", "1\t10\t5\t300\n1\t20\t3\t100\n")
    write(folder, "u.item", "10|A (1990)|||u|0|1\n20|B|||u|1|0\n")
    write(folder, "u.genre", "unknown|0\nDrama|1\n")
    return folder


def test_load_raw_dispatch(tmp_path):
    folder = ml_folder(tmp_path)
    assert load_raw("ml-100k", data_dir=folder).name == "ml-100k"
    assert len(load_raw("ml-100k", data_dir=tmp_path, download=False)) == 2  # the parent folder
    assert load_raw("movielens", data_dir=folder, domain="film").domain == "film"
    write(tmp_path / "ml-10M100K", "ratings.dat", "1::2::3::4\n")
    write(tmp_path / "ml-10M100K", "movies.dat", "2::X (2000)::Drama\n")
    assert load_raw("ml-10m", data_dir=tmp_path).name == "ml-10m"
    write(tmp_path / "shop", "shop.inter", "user_id:token\titem_id:token\nu\ti\n")
    assert load_raw("recbole", data_dir=tmp_path, name="shop").name == "shop"
    assert load_raw("recbole", data_dir=tmp_path / "shop").name == "shop"
    table = write(tmp_path, "log.tsv", "user_id\titem_id\ttimestamp\nu\ti\t3\n")
    assert load_raw("csv", data_dir=table).timestamps.tolist() == [3.0]
    other = write(tmp_path, "other.csv", "a,b\nu,i\n")
    raw = load_raw("csv", data_dir=other, user="a", item="b", time=None, name="o", domain="thing")
    assert (raw.name, raw.domain, list(raw.items)) == ("o", "thing", ["i"])
    raw = load_raw("synthetic", num_users=20, num_items=80, seed=3)
    assert raw.name == "synthetic" and len(set(raw.users)) == 20
    assert load_raw("synthetic", name="syn", domain="gadget", num_users=5, num_items=80).domain == "gadget"


def test_load_raw_amazon(tmp_path):
    folder = tmp_path / "amazon"
    write(folder, "reviews_Office_Products_5.json", REVIEWS_2014)
    write(folder, "meta_Office_Products.json.gz", META_2014, compress=True)
    raw = load_raw("amazon", data_dir=folder)
    assert raw.item_attributes["A1"]["title"] == "Red & Blue Pen Set" and raw.domain == "office product"
    assert load_raw("amazon", data_dir=folder / "reviews_Office_Products_5.json", name="o").name == "o"
    write(folder, "Toys.json", '{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n')
    with pytest.raises(ValueError, match=r"expected one reviews file .* found Toys\.json, reviews_Office_Products_5"):
        load_raw("amazon", data_dir=folder)
    with pytest.warns(UserWarning, match=r"no meta_Toys\.json\[\.gz\] next to"):
        assert load_raw("amazon", data_dir=folder / "Toys.json").item_attributes == {}
    raw = load_raw("amazon", reviews=folder / "Toys.json", meta=folder / "meta_Office_Products.json.gz")
    assert raw.item_attributes == {} and raw.domain == "toy"


def test_load_raw_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'ml-5m'; valid names: ml-100k, ml-1m, .*, synthetic"):
        load_raw("ml-5m")
    with pytest.raises(ValueError, match=r"dataset 'ml-100k' does not take option\(s\) seed \(it takes: domain\)"):
        load_raw("ml-100k", seed=1)
    for dataset, match in [
        ("ml-10m", "needs data_dir \\(--data-dir\\): a folder holding the extracted ml-10m files"),
        ("movielens", "needs data_dir"),
        ("recbole", "needs data_dir"),
        ("csv", "needs data_dir .*interactions table"),
        ("amazon", "needs data_dir .*reviews file"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_raw(dataset)
    with pytest.raises(ValueError, match="downloads are off"):
        load_raw("ml-1m", download=False)
    with pytest.raises(ValueError, match="amazon: data_dir .* does not exist"):
        load_raw("amazon", data_dir=tmp_path / "none")


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser()
    add_dataset_arguments(result)
    return result


def test_command_line_flags(tmp_path):
    items = write(tmp_path, "items.tsv", "item\ttitle\tnote\na\tA\tx\n")
    table = write(tmp_path, "log.txt", "who\titem\twhen\nu\ta\t2020-01-01\n")
    args = parser().parse_args(["--dataset", "csv", "--data-dir", str(table), "--user-col", "who", "--item-col",
                                "item", "--time-col", "when", "--sep", "\\t", "--item-file", str(items),
                                "--item-text", "title", "--domain", "letter"])  # fmt: skip
    raw = raw_from_args(args)
    assert raw.name == "log" and raw.domain == "letter" and raw.item_attributes == {"a": {"title": "A"}}
    assert raw.timestamps.tolist() == [1577836800.0]
    args = parser().parse_args(["--dataset", "synthetic", "--synthetic-users", "7", "--synthetic-items", "64",
                                "--synthetic-seed", "2"])  # fmt: skip
    assert len(set(raw_from_args(args).users)) == 7
    no_time = parser().parse_args(["--dataset", "csv", "--data-dir", str(table), "--sep", "tab", "--user-col", "who",
                                   "--item-col", "item", "--time-col", ""])  # fmt: skip
    assert raw_from_args(no_time).timestamps.tolist() == [0.0]
    with pytest.raises(ValueError, match="--user-col only applies to --dataset csv, not synthetic"):
        raw_from_args(parser().parse_args(["--dataset", "synthetic", "--user-col", "x"]))
    with pytest.raises(ValueError, match="--synthetic-seed only applies to --dataset synthetic, not ml-100k"):
        raw_from_args(parser().parse_args(["--dataset", "ml-100k", "--synthetic-seed", "1"]))
    with pytest.raises(SystemExit):
        parser().parse_args([])
    optional = argparse.ArgumentParser()
    add_dataset_arguments(optional, required=False)
    with pytest.raises(ValueError, match="--dataset is required"):
        raw_from_args(optional.parse_args([]))
    assert set(DATASETS) >= {"ml-100k", "amazon", "csv", "synthetic"}
    helps = [action.help for action in parser()._actions if action.dest != "help"]
    assert all(helps)


# ------------------------------------------------------------------------------------------ real data


@needs_shared
def test_real_data_through_load_raw():
    for data_dir in (SHARED / "ml-100k", SHARED):
        raw = load_raw("ml-100k", data_dir=data_dir, download=False)
        assert raw.name == "ml-100k" and len(raw) == 100_000 and raw.domain == "movie"
    raw = load_raw("recbole", data_dir=SHARED, name="amazon-office", domain="office product")
    assert len(raw) == 53_258 and raw.domain == "office product"
    inter = SHARED / "amazon-office" / "amazon-office.inter"
    # The RecBole file read as a generic TSV table (its headers are "name:type").
    table = load_raw("csv", data_dir=inter, sep="\t", user="user_id:token", item="item_id:token",
                     time="timestamp:float", item_path=SHARED / "amazon-office" / "amazon-office.item",
                     item_key="item_id:token")  # fmt: skip
    assert len(table) == 53_258 and np.array_equal(table.items, raw.items)
    assert table.item_attributes["B0000AG93P"]["text:token_seq"] == raw.item_attributes["B0000AG93P"]["text"]


def test_csv_text_with_unicode_line_separators_stays_one_record(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text('user_id,item_id,timestamp,title\nu1,i1,1,"a\u2028b\x0bc"\nu1,i2,2,plain\nu1,i3,3,x\n', "utf-8")
    raw = load_table(path, user="user_id", item="item_id", time="timestamp")
    assert list(raw.items) == ["i1", "i2", "i3"]
