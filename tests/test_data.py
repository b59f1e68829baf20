"""Dataset loaders and preprocessing (grasp.data): real shared datasets, fixture layouts, errors, properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from grasp.data import (
    DataError,
    RawDataset,
    head_threshold,
    load_movielens,
    load_recbole,
    preprocess,
    statistics,
    statistics_table,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared datasets not found at {SHARED}")


def write(folder: Path, name: str, text: str | bytes, encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
    return path


def raw(rows: list[tuple[str, str, float]], name: str = "toy") -> RawDataset:
    users, items, times = zip(*rows, strict=True)
    return RawDataset(name, np.array(users, dtype=object), np.array(items, dtype=object), np.array(times, float))


# ------------------------------------------------------------------------------------------ real datasets


@needs_shared
def test_ml100k_real():
    data = load_movielens(SHARED / "ml-100k")
    assert data.name == "ml-100k"
    assert len(data) == 100_000
    assert len(set(data.users)) == 943 and len(set(data.items)) == 1682
    assert len(data.item_attributes) == 1682 and len(data.user_attributes) == 943
    toy_story = data.item_attributes["1"]
    assert toy_story["title"] == "Toy Story" and toy_story["year"] == "1995"
    assert toy_story["genres"] == "Animation, Children's, Comedy"
    assert toy_story["release_date"] == "01-Jan-1995"
    assert data.user_attributes["1"] == {"age": "24", "gender": "M", "occupation": "technician"}
    assert data.timestamps.dtype == np.float64 and data.timestamps.min() > 8e8

    stats = statistics(preprocess(data))
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100_000)


@needs_shared
def test_amazon_office_real():
    data = load_recbole(SHARED / "amazon-office")
    assert data.name == "amazon-office"
    assert len(data) == 53_258
    assert len(set(data.users)) == 4905 and len(set(data.items)) == 2420
    assert len(data.item_attributes) == 2420 and data.user_attributes == {}
    assert data.item_attributes["B0000AG93P"]["text"].startswith("HP 78 Tri-Color Printer Cartridge")

    dataset = preprocess(data, k_core=5)  # already 5-core: nothing is dropped
    assert (dataset.num_users, dataset.num_items, dataset.num_interactions) == (4905, 2420, 53_258)
    table = statistics_table(dataset)
    assert "| amazon-office | 4,905 | 2,420 | 53,258 | 10.86 |" in table
    assert f"train length ≥ {dataset.head_user_threshold}" in table


# ------------------------------------------------------------------------------------------ fixture layouts


def ml100k_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ml-tiny"
    write(folder, "u.data", "1\t10\t5\t300\n1\t20\t3\t100\n2\t10\t4\t200\n")
    write(folder, "u.genre", "unknown|0\nAction|1\nDrama|2\n\n")
    write(folder, "u.item", "10|Café Society (1996)|01-Jan-1996||url|0|1|1\n20|unknown|||url|1|0|0\n", "latin-1")
    write(folder, "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n")
    return folder


def test_ml100k_layout(tmp_path):
    data = load_movielens(ml100k_folder(tmp_path))
    assert data.name == "ml-tiny"
    assert list(data.users) == ["1", "1", "2"] and list(data.items) == ["10", "20", "10"]
    assert data.timestamps.tolist() == [300.0, 100.0, 200.0]
    assert data.item_attributes["10"] == {
        "title": "Café Society", "year": "1996", "release_date": "01-Jan-1996", "genres": "Action, Drama"
    }  # fmt: skip
    assert data.item_attributes["20"] == {"title": "unknown"}  # "unknown" genre and empty date left out
    assert data.user_attributes["2"] == {"age": "53", "gender": "F", "occupation": "other"}


def test_ml1m_dat_layout(tmp_path):
    folder = tmp_path / "ml-1m"
    write(folder, "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(folder, "movies.dat", "1193::One Flew Over (1975)::Drama\n661::Amélie (2001)::Comedy|Romance\n", "latin-1")
    write(folder, "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    data = load_movielens(folder, name="one-m")
    assert data.name == "one-m" and len(data) == 3
    assert data.item_attributes["661"] == {"title": "Amélie", "year": "2001", "genres": "Comedy, Romance"}
    assert data.user_attributes["1"] == {"age": "under 18", "gender": "F", "occupation": "K-12 student"}
    assert data.user_attributes["2"] == {"age": "56+", "gender": "M", "occupation": "self-employed"}


def test_ml10m_dat_layout_without_users(tmp_path):
    folder = tmp_path / "ml-10m"
    write(folder, "ratings.dat", "5::7::4.5::1100000000\n5::8::1::1000000000\n")
    write(folder, "movies.dat", "7::Sabrina (1995)::Comedy|Romance\n8::Tom::Huck (1995)::(no genres listed)\n")
    data = load_movielens(folder)
    assert data.user_attributes == {}
    assert data.item_attributes["8"] == {"title": "Tom::Huck", "year": "1995"}


def test_ml20m_csv_layout(tmp_path):
    folder = tmp_path / "ml-20m"
    write(folder, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n")
    write(folder, "movies.csv", 'movieId,title,genres\n2,"American President, The (1995)",Comedy|Drama|Romance\n'
                                "29,Jumanji (1995),Adventure\n")  # fmt: skip
    data = load_movielens(folder)
    assert list(data.items) == ["2", "29"] and data.timestamps.tolist() == [1112486027.0, 1112484676.0]
    assert data.item_attributes["2"] == {
        "title": "American President, The", "year": "1995", "genres": "Comedy, Drama, Romance"
    }  # fmt: skip


def test_recbole_layout_with_item_and_user(tmp_path):
    folder = tmp_path / "shop"
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    write(folder, "shop.inter", header + "u1\ti1\t5\t3\nu1\ti2\t4\t1\n")
    write(folder, "shop.item", "item_id:token\ttitle:token_seq\tprice:float\tbrand:token\ni1\tRed Pen\t1.5\tBic\n"
                               "i2\tBlue Ink\t2\t\n")  # fmt: skip
    write(folder, "shop.user", "user_id:token\tage:token\tvec:float_seq\nu1\t30\t0.1 0.2\n")
    data = load_recbole(folder)
    assert data.name == "shop" and list(data.users) == ["u1", "u1"] and data.timestamps.tolist() == [3.0, 1.0]
    assert data.item_attributes == {"i1": {"title": "Red Pen", "brand": "Bic"}, "i2": {"title": "Blue Ink"}}
    assert data.user_attributes == {"u1": {"age": "30"}}


def test_recbole_without_timestamp_uses_file_order(tmp_path):
    folder = tmp_path / "x"
    write(folder, "y.inter", "item_id:token\tuser_id:token\na\tu\nb\tu\n")
    data = load_recbole(folder, name="y")
    assert data.timestamps.tolist() == [0.0, 1.0] and data.item_attributes == {}


# ------------------------------------------------------------------------------------------ errors


def expect(match: str, load, *args) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        load(*args)
    return info.value


def test_missing_folders_files_and_layout(tmp_path):
    expect(r"nowhere: MovieLens folder not found", load_movielens, tmp_path / "nowhere")
    expect(r"no MovieLens layout found: expected u\.data", load_movielens, tmp_path)
    folder = ml100k_folder(tmp_path)
    (folder / "u.item").unlink()
    expect(r"u\.item: file not found", load_movielens, folder)
    expect(r"nope\.inter: file not found", load_recbole, tmp_path, "nope")
    expect(r"RecBole folder not found", load_recbole, tmp_path / "nowhere")


def test_missing_columns(tmp_path):
    write(tmp_path, "a.inter", "user_id:token\ttimestamp:float\nu\t1\n")
    error = expect(r"a\.inter:1: missing column 'item_id'", load_recbole, tmp_path, "a")
    assert error.line == 1 and error.path.endswith("a.inter")
    write(tmp_path / "m", "ratings.csv", "userId,movieId,rating\n1,2,3\n")
    expect(r"ratings\.csv:1: missing column\(s\) timestamp", load_movielens, tmp_path / "m")
    write(tmp_path / "b", "b.inter", "user_id:token\titem_id:token\nu\ti\n")
    write(tmp_path / "b", "b.item", "title:token_seq\nx\n")
    expect(r"b\.item:1: missing column 'item_id'", load_recbole, tmp_path / "b")


def test_header_errors(tmp_path):
    write(tmp_path, "a.inter", "user_id:token\titem_id:token\tts:datetime\nu\ti\t1\n")
    expect(r"a\.inter:1: unknown field type 'datetime' in 'ts:datetime'", load_recbole, tmp_path, "a")
    write(tmp_path, "b.inter", "user_id\titem_id:token\nu\ti\n")
    expect(r"b\.inter:1: header column 'user_id' is not of the form name:type", load_recbole, tmp_path, "b")
    write(tmp_path, "c.inter", "user_id:token\titem_id:token\tuser_id:token\nu\ti\tv\n")
    expect(r"c\.inter:1: duplicate header column 'user_id'", load_recbole, tmp_path, "c")
    write(tmp_path / "m", "ratings.csv", "userId,movieId,timestamp,userId\n1,2,3,4\n")
    expect(r"ratings\.csv:1: duplicate header column\(s\) userId", load_movielens, tmp_path / "m")


def test_non_numeric_timestamps(tmp_path):
    write(tmp_path, "a.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\tj\tyesterday\n")
    expect(r"a\.inter:3: non-numeric timestamp 'yesterday'", load_recbole, tmp_path, "a")
    write(tmp_path, "n.inter", "user_id:token\titem_id:token\ttimestamp:float\nu\ti\tnan\n")
    expect(r"n\.inter:2: timestamp 'nan' is not a finite number", load_recbole, tmp_path, "n")
    folder = ml100k_folder(tmp_path)
    write(folder, "u.data", "1\t10\t5\t300\n\n1\t20\t3\t1e9x\n")
    expect(r"u\.data:3: non-numeric timestamp '1e9x'", load_movielens, folder)
    write(tmp_path / "c", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,3,3,\n")
    expect(r"ratings\.csv:3: non-numeric timestamp ''", load_movielens, tmp_path / "c")


def test_empty_files(tmp_path):
    write(tmp_path, "a.inter", "")
    expect(r"a\.inter: file is empty", load_recbole, tmp_path, "a")
    write(tmp_path, "b.inter", "user_id:token\titem_id:token\n\n")
    expect(r"b\.inter: no interactions in the file", load_recbole, tmp_path, "b")
    folder = ml100k_folder(tmp_path)
    write(folder, "u.user", "\n \n")
    expect(r"u\.user: file is empty", load_movielens, folder)


def test_non_utf8_bytes(tmp_path):
    write(tmp_path, "a.inter", b"user_id:token\titem_id:token\nu\ti\nu\tcaf\xe9\n")
    error = expect(r"a\.inter:3: invalid utf-8 byte 0xe9 at byte offset 37", load_recbole, tmp_path, "a")
    assert error.line == 3
    write(tmp_path / "c", "ratings.csv", b"userId,movieId,rating,timestamp\n\xff,2,3,4\n")
    expect(r"ratings\.csv:2: invalid utf-8 byte 0xff", load_movielens, tmp_path / "c")


def test_malformed_rows(tmp_path):
    write(tmp_path, "a.inter", "user_id:token\titem_id:token\nu\ti\textra\n")
    expect(r"a\.inter:2: expected 2 tab-separated fields, got 3", load_recbole, tmp_path, "a")
    write(tmp_path, "b.inter", "user_id:token\titem_id:token\nu\ti\n")
    write(tmp_path, "b.item", "item_id:token\ttitle:token_seq\ni\tA\nj\tB\ni\tC\n")
    expect(r"b\.item:4: duplicate item_id 'i' \(first on line 2\)", load_recbole, tmp_path, "b")
    folder = ml100k_folder(tmp_path)
    write(folder, "u.data", "1\t10\t5\n")
    expect(r"u\.data:1: expected at least 4 '\\t'-separated fields, got 3", load_movielens, folder)


# ------------------------------------------------------------------------------------------ preprocessing


def test_time_order_is_stable_on_ties():
    rows = [("u", "a", 5), ("u", "b", 1), ("u", "c", 5), ("u", "d", 1), ("u", "e", 3), ("v", "a", 0)] + [
        ("v", x, 0) for x in "edcb"
    ]
    data = preprocess(raw(rows))
    u, v = data.user_ids["u"], data.user_ids["v"]
    assert [data.item_tokens[i] for i in data.sequences[u]] == ["b", "d", "e", "a", "c"]
    assert [data.item_tokens[i] for i in data.sequences[v]] == ["a", "e", "d", "c", "b"]
    assert data.timestamps[u].tolist() == [1, 1, 3, 5, 5]


def random_raw(seed: int = 0, n: int = 3000, users: int = 150, items: int = 120) -> RawDataset:
    rng = np.random.default_rng(seed)
    user = rng.zipf(1.5, n) % users
    item = rng.zipf(1.3, n) % items
    stamps = rng.integers(0, 50, n)  # many ties
    return raw([(f"u{a}", f"i{b}", float(t)) for a, b, t in zip(user, item, stamps, strict=True)], "random")


@pytest.mark.parametrize("k_core", [0, 2, 5])
def test_ids_split_and_core(k_core):
    source = random_raw()
    data = preprocess(source, k_core=k_core)
    assert data.num_users > 10 and data.num_items > 10
    assert data.user_tokens[0] == "" and data.item_tokens[0] == "" and len(data.sequences[0]) == 0
    every = np.concatenate(data.sequences[1:])
    assert every.min() >= 1 and every.max() == data.num_items  # 0 is never an item id
    assert sorted(data.user_ids.values()) == list(range(1, data.num_users + 1))
    assert np.bincount(every, minlength=data.num_items + 1)[1:].min() >= max(k_core, 1)
    for u in range(1, data.num_users + 1):
        seq = data.sequences[u]
        assert len(seq) >= max(3, k_core)
        assert np.array_equal(data.train[u], seq[:-2])
        assert data.valid_items[u] == seq[-2] and data.test_items[u] == seq[-1]
        assert np.all(np.diff(data.timestamps[u]) >= 0)
    assert data.valid_items[0] == 0 and data.test_items[0] == 0
    assert sum(len(t) for t in data.train) + 2 * data.num_users == data.num_interactions
    # The kept interactions are exactly the raw ones of kept users and items (no other interaction dropped).
    kept_users = {data.user_tokens[u] for u in range(1, data.num_users + 1)}
    kept_items = set(data.item_tokens[1:])
    expected = sum(1 for a, b in zip(source.users, source.items, strict=True) if a in kept_users and b in kept_items)
    assert data.num_interactions == expected
    # Tokens round-trip.
    u = data.num_users
    token_rows = [(b, t) for a, b, t in zip(source.users, source.items, source.timestamps, strict=True)
                  if a == data.user_tokens[u]]  # fmt: skip
    assert sorted(data.item_tokens[i] for i in data.sequences[u]) == sorted(b for b, _ in token_rows)


def test_k_core_is_maximal():
    """Iterating the filter on the result removes nothing more, and a naive loop agrees."""
    source = random_raw(seed=1)
    data = preprocess(source, k_core=4)
    keep = [(a, b) for a, b in zip(source.users, source.items, strict=True)]
    while True:
        users = {a: 0 for a, _ in keep}
        items = {b: 0 for _, b in keep}
        for a, b in keep:
            users[a] += 1
            items[b] += 1
        new = [(a, b) for a, b in keep if users[a] >= 4 and items[b] >= 4]
        if len(new) == len(keep):
            break
        keep = new
    assert len(keep) == data.num_interactions
    assert {a for a, _ in keep} == set(data.user_tokens[1:])


def test_min_user_interactions_and_attributes():
    rows = [("a", "x", 1), ("a", "y", 2), ("b", "x", 1), ("b", "y", 2), ("b", "z", 3), ("c", "z", 1)]
    source = raw(rows)
    source.item_attributes = {"x": {"title": "X"}}
    source.user_attributes = {"b": {"age": "3"}}
    data = preprocess(source)
    assert data.user_tokens == ["", "b"] and data.item_tokens == ["", "x", "y", "z"]  # c's z is dropped, b's kept
    assert data.item_attributes == {1: {"title": "X"}, 2: {}, 3: {}} and data.user_attributes == {1: {"age": "3"}}
    assert data.train[1].tolist() == [1] and data.valid_items[1] == 2 and data.test_items[1] == 3
    with pytest.raises(ValueError, match="empty after filtering"):
        preprocess(source, min_user_interactions=4)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 1.0])
def test_head_tail_fractions(fraction):
    data = preprocess(random_raw(seed=2), head_fraction=fraction)
    lengths = np.array([len(t) for t in data.train[1:]])
    popularity = data.item_popularity[1:]
    assert not data.user_is_head[0] and not data.item_is_head[0] and data.item_popularity[0] == 0
    for values, head, threshold in [
        (lengths, data.user_is_head[1:], data.head_user_threshold),
        (popularity, data.item_is_head[1:], data.head_item_threshold),
    ]:
        assert np.array_equal(head, values >= threshold)
        assert head.mean() >= fraction - 1e-12  # ties at the threshold all count as head
        assert (values > threshold).mean() < fraction or fraction == 1.0
    assert data.item_popularity.sum() == sum(len(t) for t in data.train)
    stats = statistics(data)
    assert stats["head_users"] == data.user_is_head.sum() and stats["head_item_threshold"] == data.head_item_threshold


def test_head_threshold_values():
    assert head_threshold(np.array([5, 1, 3, 9, 7, 2, 8, 4, 6, 10]), 0.2) == 9
    assert head_threshold(np.array([1, 1, 1, 1]), 0.2) == 1
    assert head_threshold(np.array([4]), 0.01) == 4


def test_empty_after_filtering_and_bad_settings():
    source = raw([("a", "x", 1), ("a", "y", 2), ("b", "x", 1)])
    with pytest.raises(ValueError, match=r"dataset 'toy' is empty after filtering \(k_core=0, min_user_interac"
                                         r"tions=3\): it had 3 interactions of 2 users and 2 items"):  # fmt: skip
        preprocess(source)
    dense = raw([(u, i, 0) for u in "abc" for i in "xyz"])
    with pytest.raises(ValueError, match=r"empty after filtering \(k_core=4"):
        preprocess(dense, k_core=4)
    assert preprocess(dense, k_core=3).num_interactions == 9
    with pytest.raises(ValueError, match="min_user_interactions must be >= 3"):
        preprocess(dense, min_user_interactions=2)
    with pytest.raises(ValueError, match=r"head_fraction must be in \(0, 1\]"):
        preprocess(dense, head_fraction=0)
    with pytest.raises(ValueError, match="k_core must be >= 0"):
        preprocess(dense, k_core=-1)


def test_statistics_table():
    data = preprocess(raw([(u, i, 0) for u in "abc" for i in "wxyz"], name="grid"))
    stats = statistics(data)
    assert stats["users"] == 3 and stats["items"] == 4 and stats["interactions"] == 12
    assert stats["avg_length"] == 4 and stats["density"] == 1
    lines = statistics_table(data).splitlines()
    assert len(lines) == 3 and lines[0].startswith("| Dataset | #Users | #Items | #Interactions | Avg. length")
    assert lines[2].startswith("| grid | 3 | 4 | 12 | 4.00 | 100.0000% |")
