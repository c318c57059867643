"""FER+ (download_dataset.py --ferplus): Microsoft's majority labels for FER2013's images.

The real vote file (../shared/ferplus/fer2013new.csv, MIT) labels a synthetic fer2013.csv of the
real length whose pixels name their row, so every image can be followed to its folder."""

import csv
import functools
import hashlib
import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_resume_is_exact, shared_path
from download_dataset import main, parse_args
from importers import FERPLUS_URL, ferplus_majority
from test_download import assert_nothing_left, one_line_error, write_csv

import datasets
from datasets import DatasetError

REPO_ROOT = Path(__file__).resolve().parents[1]
FERPLUS_DIR = Path(os.environ.get("EMONEXT_FERPLUS_DIR") or REPO_ROOT.parent / "shared" / "ferplus")
# The vote columns' classes, as the paper names them (neutral, happiness, ...).
PAPER_CLASSES = ["Neutral", "Happy", "Surprise", "Sad", "Angry", "Disgust", "Fear", "Contempt"]
EIGHT = sorted(PAPER_CLASSES)
SPLIT_OF = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


@pytest.fixture(scope="module")
def vote_file() -> Path:
    """The real fer2013new.csv; beside the clone in CI (where its absence is a failure)."""
    return shared_path(FERPLUS_DIR / "fer2013new.csv", "FER+ vote file")


@pytest.fixture(scope="module")
def vote_rows(vote_file) -> list[list[str]]:
    with open(vote_file, newline="") as f:
        return list(csv.reader(f))[1:]


def paper_label(fields: list[str]) -> str | None:
    """The majority rule as the paper and the vote file's README state it, row by row: votes of
    1 are outliers; the top emotion needs more than half of the remaining votes; unknown (8) and
    not-a-face (9) majorities and rows without an image name are not in FER+."""
    if not fields[1].strip():
        return None
    votes = [int(v) if int(v) > 1 else 0 for v in fields[2:]]
    top = max(range(10), key=votes.__getitem__)
    if 2 * votes[top] <= sum(votes) or top >= 8:
        return None
    return PAPER_CLASSES[top]


@pytest.fixture(scope="module")
def ferplus_root(tmp_path_factory, vote_file, vote_rows) -> Iterator[Path]:
    """FERPlus from a fer2013.csv of 35,887 rows: row r's first three pixels are r in base 256
    (the rest 0), its Usage the vote file's; its FER2013 emotion is anything (r mod 7). Removed
    afterwards (the CSV is 165 MB, the 31,412 images another 130 MB on disk)."""
    folder = tmp_path_factory.mktemp("ferplus")
    zeros = " 0" * 2301
    lines = [f"{r % 7},{r >> 16} {(r >> 8) & 255} {r & 255}{zeros},{fields[0]}\n"
             for r, fields in enumerate(vote_rows)]  # fmt: skip
    (folder / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "".join(lines))
    try:
        out = main(["--csv", str(folder / "fer2013.csv"), "--ferplus", str(vote_file),
                    "--out", str(folder / "FERPlus")])  # fmt: skip
        (folder / "fer2013.csv").unlink()
        yield out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_every_image_lands_under_its_label(ferplus_root, vote_rows):
    assert len(vote_rows) == 35887
    expected = {}
    for row, fields in enumerate(vote_rows):
        label = paper_label(fields)
        if label is not None:
            expected[row] = (SPLIT_OF[fields[0]], label)
    found = {}  # every image, by its name: its fer2013.csv row
    for split in datasets.SPLITS:
        for label in (ferplus_root / split).iterdir():
            for path in label.iterdir():
                found[int(path.name.removesuffix(".png"))] = (split, label.name)
    assert found == expected
    assert len(found) == 31412
    # Each image holds its own row's pixels: every 25th, in 48 x 48 (decoding all 31,412 took
    # 15 s of the suite); a shifted row would show in any of them.
    for row in sorted(found)[::25]:
        split, label = found[row]
        pixels = datasets.decode_image(ferplus_root / split / label / f"{row}.png")
        assert pixels.shape == (48, 48)
        pixels = pixels.ravel().astype(int)
        assert (pixels[0] << 16) + (pixels[1] << 8) + pixels[2] == row
        assert pixels[3:].max() == 0  # nothing but the row number was written


def table_row(name: str, counts: dict[str, int]) -> str:
    values = [counts.get(c, 0) for c in EIGHT]
    return f"| {name} | " + " | ".join(f"{v:,}" for v in [*values, sum(values)]) + " |"


def test_counts_and_drops_are_the_ones_docs_data_md_states(ferplus_root, repo_root):
    manifest = datasets.read_manifest(ferplus_root)
    docs = (repo_root / "docs" / "DATA.md").read_text()
    for split in datasets.SPLITS:
        assert table_row(split, manifest["counts"][split]) in docs, split
    assert manifest["total"] == 31412 and f"{manifest['total']:,}" in docs
    dropped = manifest["labels"]["dropped"]
    for reason in ("no image name", "no majority", "majority unknown", "majority not a face"):
        values = [dropped[s].get(reason, 0) for s in datasets.SPLITS]
        cells = " | ".join(f"{v:,}" for v in [*values, sum(values)])
        assert f"| {reason} | {cells} |" in docs, reason


def test_manifest_and_votes_csv_keep_every_rows_votes(ferplus_root, vote_file, vote_rows):
    manifest = datasets.read_manifest(ferplus_root)
    assert manifest["dataset"] == "FERPlus" and manifest["class_order"] == EIGHT
    labels = manifest["labels"]
    assert labels["mode"] == "majority" and labels["votes"] == "votes.csv"
    assert labels["sha256"] == hashlib.sha256(vote_file.read_bytes()).hexdigest()
    votes_csv = ferplus_root / "votes.csv"
    assert manifest["files"] == {"votes.csv": hashlib.sha256(votes_csv.read_bytes()).hexdigest()}
    with open(votes_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(vote_rows)
    columns = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
               "contempt", "unknown", "NF"]  # fmt: skip
    for row, (entry, fields) in enumerate(zip(table, vote_rows, strict=True)):
        assert int(entry["fer2013_row"]) == row and entry["usage"] == fields[0]
        assert entry["image_name"] == fields[1] and [entry[c] for c in columns] == fields[2:]
        label = paper_label(fields)
        assert entry["label"] == (label or "") and bool(entry["dropped"]) == (label is None)
        if label:
            assert entry["path"] == f"{SPLIT_OF[fields[0]]}/{label}/{row}.png"
            assert (ferplus_root / entry["path"]).is_file()


def test_the_rule_on_the_cases_that_decide_it():
    votes = np.array(
        [
            [6, 0, 0, 4, 0, 0, 0, 0, 0, 0],  # 6 of 10: neutral
            [5, 0, 0, 5, 0, 0, 0, 0, 0, 0],  # a tie at half: no majority
            [5, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # single votes removed: 5 of 5
            [4, 3, 1, 1, 1, 0, 0, 0, 0, 0],  # 4 of 7 after removal: neutral
            [3, 3, 2, 1, 1, 0, 0, 0, 0, 0],  # 3 of 8: no majority
            [0, 0, 0, 0, 0, 0, 0, 3, 2, 1],  # contempt, 3 of 5
            [2, 0, 0, 0, 0, 0, 0, 0, 6, 2],  # majority unknown
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],  # majority not a face
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # all single votes: nothing left, no majority
            [9, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # one row of the real file has 9 votes
            [10, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # no image name: dropped whatever the votes
        ]
    )
    names = [f"fer{i:07d}.png" for i in range(10)] + [""]
    labels, reasons = ferplus_majority(votes, names)
    assert labels.tolist() == [0, -1, 0, 0, -1, 7, -1, -1, -1, 0, -1]
    assert reasons == ["", "no majority", "", "", "no majority", "", "majority unknown",
                       "majority not a face", "no majority", "", "no image name"]  # fmt: skip
    fields = [["Training", n, *map(str, v)] for n, v in zip(names, votes.tolist(), strict=True)]
    assert [paper_label(f) for f in fields] == [
        PAPER_CLASSES[x] if x >= 0 else None for x in labels.tolist()
    ]


def small_pair(folder: Path, mutate=None) -> tuple[Path, Path]:
    """A 42-row fer2013.csv and a fer2013new.csv for its rows: each Usage has 14 rows, whose
    i-th (i < 12) gets 6 votes for emotion i mod 8 and 4 for neutral, so every split holds every
    class (train.py accepts only such a dataset); the last two have no image name."""
    rows = write_csv(folder / "fer2013.csv")
    header = ["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger",
              "disgust", "fear", "contempt", "unknown", "NF"]  # fmt: skip
    votes = []
    for r, (_, _, usage) in enumerate(rows):
        counts = [0] * 10
        counts[0], counts[r % 14 % 8] = 4, counts[r % 14 % 8] + 6
        name = "" if r % 14 >= 12 else f"fer{r:07d}.png"
        votes.append([usage, name, *map(str, counts)])
    if mutate:
        header, votes = mutate(header, votes)
    with open(folder / "fer2013new.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *votes])
    return folder / "fer2013.csv", folder / "fer2013new.csv"


def test_ferplus_from_a_url_of_a_local_http_server(tmp_path, capsys):
    fer, votes = small_pair(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{votes.name}"
        out = main(["--csv", str(fer), "--ferplus", url, "--out", str(tmp_path / "FERPlus")])
        manifest = datasets.read_manifest(out)
        assert manifest["source"]["ferplus"] == url
        assert manifest["labels"]["sha256"] == hashlib.sha256(votes.read_bytes()).hexdigest()
        assert manifest["total"] == 42 - 6  # every row with an image name has a majority
        with open(votes, newline="") as f:
            rows = list(csv.reader(f))[1:]
        counts: dict[str, dict[str, int]] = {}
        for fields in rows:
            if label := paper_label(fields):
                split = counts.setdefault(SPLIT_OF[fields[0]], {})
                split[label] = split.get(label, 0) + 1
        assert manifest["counts"] == counts and counts["train"]["Contempt"] == 1  # row 7
        with pytest.raises(DatasetError, match="could not download .*404"):
            main(["--csv", str(fer), "--ferplus", url + ".missing", "--out", str(tmp_path / "x")])
        assert_nothing_left(tmp_path, {"fer2013.csv", "fer2013new.csv", "FERPlus"})
    finally:
        server.shutdown()
        server.server_close()


def test_rerun_force_and_votes_csv_as_the_tools_own(tmp_path, capsys):
    fer, votes = small_pair(tmp_path)
    argv = ["--csv", str(fer), "--ferplus", str(votes), "--out", str(tmp_path / "FERPlus")]
    out = main(argv)
    assert main(argv) == out and "already there" in capsys.readouterr().out
    main([*argv, "--force", "--format", "jpg"])  # votes.csv is the tool's own: replaced
    assert len(list(out.rglob("*.jpg"))) == datasets.read_manifest(out)["total"] == 36
    with open(out / "votes.csv", "a") as f:
        f.write("a user's line\n")
    with pytest.raises(DatasetError, match="votes.csv"):  # changed: never deleted
        main([*argv, "--force"])
    assert (out / "votes.csv").read_text().endswith("a user's line\n")


def _drop_row(header, votes):
    return header, votes[:-1]


def _swap_usage(header, votes):
    votes[3][0] = "PrivateTest" if votes[3][0] != "PrivateTest" else "Training"
    return header, votes


def _bad_vote(header, votes):
    votes[5][4] = "x"
    return header, votes


def _huge_vote(header, votes):
    votes[5][4] = str(10**30)  # was an OverflowError traceback
    return header, votes


def _no_votes(header, votes):
    """Every vote 0: no image has a majority (the conversion wrote 0 images, exit 0)."""
    return header, [[*row[:2], *["0"] * 10] for row in votes]


def _no_test_votes(header, votes):
    """No PrivateTest image has a majority: train.py refused the dataset it wrote (exit 0)."""
    return header, [[*row[:2], *["0"] * 10] if row[0] == "PrivateTest" else row for row in votes]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (_drop_row, "has 41 rows but .*fer2013.csv has 42"),
        (_swap_usage, "row 3: .* says Training but .* says PrivateTest"),
        (_bad_vote, "row 5 .*non-negative integers"),
        (lambda h, v: (h[:2] + h[3:], [r[:2] + r[3:] for r in v]), "not fer2013new.csv's"),
        (_huge_vote, r"row 5 \(line 7\): votes must be non-negative integers of at most 10"),
        (_no_votes, "by FER\\+'s majority rule no Training row gets a label, but train.py"),
        (_no_test_votes, "majority rule no PrivateTest row gets a label, but train.py needs"),
    ],
    ids=["rows", "usage", "vote", "header", "huge-vote", "no-votes", "no-test-votes"],
)
def test_vote_files_that_do_not_fit(tmp_path, mutate, match):
    """A vote file that does not fit is one line and nothing written: a conversion gives a
    dataset train.py accepts, or nothing."""
    fer, votes = small_pair(tmp_path, mutate)
    with pytest.raises(DatasetError, match=match) as err:
        main(["--csv", str(fer), "--ferplus", str(votes), "--out", str(tmp_path / "FERPlus")])
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert_nothing_left(tmp_path, {"fer2013.csv", "fer2013new.csv"})


def test_ferplus_flag(tmp_path, capsys):
    assert parse_args(["--csv", "fer2013.csv", "--ferplus"]).ferplus == FERPLUS_URL
    args = parse_args(["--csv", "fer2013.csv", "--ferplus", "votes.csv"])
    assert args.out == "FERPlus" and parse_args(["--csv", "fer2013.csv"]).out == "FER2013"
    with pytest.raises(SystemExit) as exit_info:
        main(["--folder", str(tmp_path), "--ferplus", "votes.csv"])
    assert exit_info.value.code == 2
    assert re.match(r"--ferplus labels fer2013.csv's rows", one_line_error(capsys.readouterr().err))


# --------------------------------------------------------------------------------------------
# The four training modes (Barsoum et al. 2016; Microsoft's FERPlus ferplus.py and train.py -m)
# --------------------------------------------------------------------------------------------

MODES = ["majority", "probability", "crossentropy", "multi_target"]


def mode_target(fields: list[str], mode: str) -> list[float] | None:
    """The training target of a vote row in `mode`, as the rules read: votes of 1 dropped; then
    majority: the top emotion with more than half; probability/crossentropy: vote levels taken
    from the top (tied columns together) while they hold under 75 % of the votes in under 3
    columns, an unknown/not-a-face column ending it (and dropped unless it came first), kept
    with more than half of the votes in at most 3 columns; multi_target: the columns with at
    least 30 % of the votes, kept with more than half. Kept only where the most-voted chosen
    column (the first of a tie) is an emotion; the target is the chosen emotions' votes,
    normalised. None: not a training image."""
    if not fields[1].strip():
        return None
    v = [int(x) if int(x) > 1 else 0 for x in fields[2:]]
    total = sum(v)
    if mode == "majority":
        chosen = [v.index(max(v))] if 2 * max(v) > total else []
    elif mode == "multi_target":
        chosen = [i for i in range(10) if v[i] > 0 and v[i] >= 0.3 * total]
    else:
        chosen = []
        for level in sorted({x for x in v if x}, reverse=True):
            if 4 * sum(v[i] for i in chosen) >= 3 * total or len(chosen) >= 3:
                break
            tied = [i for i in range(10) if v[i] == level]
            if max(tied) >= 8:
                bad = min(i for i in tied if i >= 8)
                emotions = [i for i in tied if i < bad]
                chosen = chosen + emotions if chosen or emotions else [bad]
                break
            chosen += tied
        if len(chosen) > 3:
            chosen = []
    if not chosen or 2 * sum(v[i] for i in chosen) <= total:
        return None
    if max(chosen, key=lambda i: (v[i], -i)) >= 8:
        return None
    emotions = [i for i in chosen if i < 8]
    return [v[i] / sum(v[i] for i in emotions) if i in emotions else 0.0 for i in range(8)]


@pytest.fixture(scope="module")
def mode_targets(vote_rows) -> dict[str, list[list[float] | None]]:
    """Every row's target by `mode_target`, per mode."""
    return {mode: [mode_target(fields, mode) for fields in vote_rows] for mode in MODES}


def test_each_mode_keeps_the_images_and_targets_its_rule_gives(vote_rows, mode_targets):
    from importers import ferplus_distribution

    for mode in MODES:
        for row, fields in enumerate(vote_rows):
            expected = mode_targets[mode][row]
            got = ferplus_distribution([int(x) for x in fields[2:]], mode)
            if not fields[1].strip():  # no image name: no image, whatever the votes
                continue
            assert (got is None) == (expected is None), (mode, row, fields)
            if got is not None:
                assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-12


def mode_counts(vote_rows, mode_targets, mode: str) -> dict[str, int]:
    counts = dict.fromkeys(datasets.SPLITS, 0)
    for row, fields in enumerate(vote_rows):
        # val and test are majority-labelled in every mode, as Microsoft's train.py evaluates
        rule = mode if fields[0] == "Training" else "majority"
        counts[SPLIT_OF[fields[0]]] += mode_targets[rule][row] is not None
    return counts


def test_kept_counts_per_mode_are_the_ones_docs_data_md_states(
    vote_file, vote_rows, mode_targets, repo_root
):
    from download_dataset import ferplus_targets
    from importers import read_ferplus

    docs = (repo_root / "docs" / "DATA.md").read_text()
    votes = read_ferplus(vote_file)
    for mode in MODES:
        counts = mode_counts(vote_rows, mode_targets, mode)
        cells = " | ".join(f"{counts[s]:,}" for s in datasets.SPLITS)
        assert f"| {mode} | {cells} | {sum(counts.values()):,} |" in docs, mode
        labels, _, soft = ferplus_targets(votes, mode)
        for split in datasets.SPLITS:
            rows = [i for i, u in enumerate(votes.usage) if SPLIT_OF[u] == split]
            assert sum(labels[i] >= 0 for i in rows) == counts[split], (mode, split)
        assert len(soft) == (0 if mode == "majority" else counts["train"])
        for i, dist in soft.items():  # a kept image's folder: its most-voted emotion
            assert labels[i] == int(np.argmax(dist)) and votes.usage[i] == "Training"
    # crossentropy keeps every majority image, under its majority, and images without one
    majority = ferplus_majority(votes.votes, votes.names)[0]
    labels = ferplus_targets(votes, "crossentropy")[0]
    assert (labels[majority >= 0] == majority[majority >= 0]).all()
    assert ((labels >= 0) & (majority < 0)).sum() == 27956 - 25060


def test_the_modes_on_the_cases_that_decide_them():
    from importers import ferplus_distribution as d

    assert d([6, 4, 0, 0, 0, 0, 0, 0, 0, 0], "crossentropy") == [0.6, 0.4] + [0.0] * 6
    assert d([4, 3, 3, 0, 0, 0, 0, 0, 0, 0], "probability") == pytest.approx(
        [0.4, 0.3, 0.3] + [0.0] * 5
    )
    assert d([4, 3, 3, 0, 0, 0, 0, 0, 0, 0], "majority") is None
    assert d([3, 2, 2, 2, 0, 0, 0, 0, 0, 0], "crossentropy") is None  # 4 columns: too many
    assert d([4, 3, 0, 0, 0, 0, 0, 0, 3, 0], "crossentropy") == pytest.approx(
        [4 / 7, 3 / 7] + [0.0] * 6  # unknown, tied with happiness, left out
    )
    assert d([4, 0, 0, 0, 0, 0, 0, 0, 4, 2], "crossentropy") is None  # 4 of 10 once it is out
    assert d([2, 0, 0, 0, 0, 0, 0, 0, 6, 2], "crossentropy") is None  # unknown first: dropped
    assert d([5, 3, 2, 0, 0, 0, 0, 0, 0, 0], "multi_target") == [0.625, 0.375] + [0.0] * 6
    assert d([5, 0, 0, 0, 0, 0, 0, 0, 3, 2], "multi_target") == [1.0] + [0.0] * 7
    assert d([4, 2, 2, 2, 0, 0, 0, 0, 0, 0], "multi_target") is None  # 4 of 10 only


def test_crossentropy_mode_writes_soft_labels_and_keeps_val_and_test_majority(tmp_path):
    def no_majority_row(header, votes):
        votes[0][2:] = ["4", "3", "3", *["0"] * 7]  # Training: kept by crossentropy only
        return header, votes

    fer, votes = small_pair(tmp_path, no_majority_row)
    base = ["--csv", str(fer), "--ferplus", str(votes)]
    out = main([*base, "--ferplus-mode", "crossentropy", "--out", str(tmp_path / "ce")])
    manifest = datasets.read_manifest(out)
    assert manifest["labels"]["mode"] == "crossentropy"
    assert manifest["settings"]["ferplus_mode"] == "crossentropy"
    soft_csv = out / "soft_labels.csv"
    assert manifest["files"]["soft_labels.csv"] == hashlib.sha256(soft_csv.read_bytes()).hexdigest()
    with open(soft_csv, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", *manifest["class_order"]]
    train = datasets.load_split(out, "train")
    assert sorted(r[0] for r in table[1:]) == sorted(
        Path(p).relative_to(out).as_posix() for p in train.paths
    )
    rows = {r[0]: [float(x) for x in r[1:]] for r in table[1:]}
    # Angry, Contempt, Disgust, Fear, Happy, Neutral, Sad, Surprise
    assert rows["train/Neutral/0.png"] == pytest.approx([0, 0, 0, 0, 0.3, 0.4, 0, 0.3])
    soft = datasets.read_soft_labels(out, train)
    assert torch.equal(soft.argmax(1), train.targets)
    assert datasets.label_mode(out) == "crossentropy"
    majority = main([*base, "--out", str(tmp_path / "majority")])
    assert not (majority / "soft_labels.csv").exists() and datasets.label_mode(majority) == (
        "majority"
    )
    assert "ferplus_mode" not in datasets.read_manifest(majority)["settings"]
    for split in ("val", "test"):  # majority-labelled in every mode
        assert datasets.count_images(out)[split] == datasets.count_images(majority)[split]
    assert datasets.count_images(out)["train"]["Neutral"] == (
        datasets.count_images(majority)["train"]["Neutral"] + 1
    )


def test_ferplus_mode_needs_ferplus(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--csv", "fer2013.csv", "--ferplus-mode", "crossentropy"])
    assert exit_info.value.code == 2
    assert "--ferplus-mode crossentropy applies to FER+ only" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Training on soft_labels.csv: the loader's targets, the losses, exact resume
# --------------------------------------------------------------------------------------------

FAST = ["--model", "emonext_micro", "--input-size", "32", "--pretrained", "none",
        "--batch-size", "16", "--val-batch-size", "64", "--device", "cpu", "--wandb", "disabled",
        "--no-progress", "--warmup-steps", "4", "--cycle-steps", "64"]  # fmt: skip


def soft_copy(synthetic_root: Path, folder: Path, mode: str, keep: int = 16) -> Path:
    """The synthetic faces (`keep` training images a class) with a soft_labels.csv (each
    training image: 0.6 on its folder's class, 0.4 on the next one) and `mode` in the
    manifest."""
    root = folder / mode
    shutil.copytree(synthetic_root, root, ignore=shutil.ignore_patterns(".cache"))
    for split, n in (
        ("train", keep),
        ("val", 1 if keep < 16 else 4),
        ("test", 1 if keep < 16 else 4),
    ):
        for class_dir in (root / split).iterdir():
            for path in sorted(class_dir.iterdir())[n:]:
                path.unlink()
    train = datasets.load_split(root, "train", cache=False)
    k = len(train.classes)
    with open(root / "soft_labels.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", *train.classes])
        for path, target in zip(train.paths, train.targets.tolist(), strict=True):
            row = [0.0] * k
            row[target], row[(target + 1) % k] = 0.6, 0.4
            out.writerow([Path(path).relative_to(root).as_posix(), *row])
    manifest = datasets.read_manifest(root)
    manifest["labels"] = {"mode": mode}
    datasets.write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def soft_faces(synthetic_root, tmp_path_factory) -> Path:
    return soft_copy(synthetic_root, tmp_path_factory.mktemp("soft"), "crossentropy")


def test_soft_and_drawn_targets_follow_the_images_and_the_seed(soft_faces):
    def epoch(targets, seed=0, epoch=0, sampler="shuffle", pipeline="fast"):
        config = datasets.DataConfig(32)
        loader = datasets.build_loader(soft_faces, "train", mode="train", batch_size=16,
                                       targets=targets, seed=seed, sampler=sampler,
                                       pipeline=pipeline, data_config=config)  # fmt: skip
        loader.set_epoch(epoch)
        batches = list(loader)
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), loader

    x0, labels, _ = epoch("label")
    x1, soft, loader = epoch("soft")
    assert torch.equal(x0, x1)  # the same images and augmentation as by default
    idx = loader.indices()
    assert torch.equal(soft, loader.split.soft_targets[idx])
    assert torch.equal(soft.argmax(1), labels) and soft.dtype == torch.float32
    _, drawn, _ = epoch("draw")
    assert drawn.dtype == torch.int64
    assert set(((drawn - labels) % 7).tolist()) == {0, 1}  # its class or the next one
    assert torch.equal(drawn, epoch("draw")[1])  # seeded
    assert not torch.equal(drawn, epoch("draw", epoch=1)[1])  # anew each epoch
    assert not torch.equal(drawn, epoch("draw", seed=1)[1])
    _, drawn_pil, _ = epoch("draw", pipeline="pil")
    assert torch.equal(drawn_pil, drawn)  # the same draws whichever pipeline
    xb, yb, balanced = epoch("soft", sampler="balanced")
    assert torch.equal(yb, balanced.split.soft_targets[balanced.indices()])
    with pytest.raises(ValueError, match="soft targets"):
        datasets.build_loader(soft_faces, "val", mode="val", targets="soft")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: [["path", *t[0][1:][::-1]], *t[1:]], "header .* is not 'path,Angry"),
        (lambda t: t[:-1], "no row for 1 training image"),
        (lambda t: [*t, t[1]], "line 114: train/.* has a row already"),
        (lambda t: [t[0], [t[1][0], "0.5", *t[1][2:]], *t[2:]], "line 2: .* sum to 1"),
        (lambda t: [t[0], [t[1][0], "nan", *t[1][2:]], *t[2:]], "line 2: .* finite"),
        (lambda t: [t[0], [t[1][0], "-0.4", "1.4", *t[1][3:]], *t[2:]], "non-negative"),
        (lambda t: [t[0], ["train/Angry/x.png", *t[1][1:]], *t[2:]], "not an image of"),
        (lambda t: [t[0], t[1][:-1], *t[2:]], "line 2 has 7 fields, expected 8"),
    ],
    ids=["header", "missing", "twice", "sum", "nan", "negative", "unknown", "fields"],
)
def test_soft_labels_that_do_not_fit_are_one_line(soft_faces, tmp_path, edit, match):
    root = tmp_path / "faces"
    shutil.copytree(soft_faces, root, ignore=shutil.ignore_patterns(".cache"))
    with open(root / "soft_labels.csv", newline="") as f:
        table = list(csv.reader(f))
    with open(root / "soft_labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(edit(table))
    with pytest.raises(DatasetError, match=match) as err:
        datasets.build_loader(root, "train", mode="train", targets="soft")
    assert "\n" not in str(err.value) and "soft_labels.csv" in str(err.value)


def test_label_mode_needs_its_file_and_a_mode(soft_faces, synthetic_root, tmp_path):
    assert datasets.label_mode(soft_faces) == "crossentropy"
    assert datasets.label_mode(synthetic_root) == "majority"
    root = tmp_path / "faces"
    shutil.copytree(soft_faces, root, ignore=shutil.ignore_patterns(".cache"))
    manifest = datasets.read_manifest(root)
    datasets.write_manifest(root, {**manifest, "labels": {"mode": "majority"}})
    with pytest.raises(DatasetError, match="labels.mode is 'majority', not one of"):
        datasets.label_mode(root)
    datasets.write_manifest(root, manifest)
    (root / "soft_labels.csv").unlink()
    with pytest.raises(DatasetError, match="says FER\\+ mode crossentropy, but .* missing"):
        datasets.label_mode(root)


def test_the_soft_losses():
    import torch.nn.functional as F

    from losses import EmoNeXtLoss, soft_target_loss

    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 8, generator=g), torch.tensor([0, 3, 7, 2, 2, 5])
    one_hot = F.one_hot(y, 8).float()
    for s in (0.0, 0.2):  # one-hot distributions: the recipe's smoothed cross-entropy
        expected = F.cross_entropy(logits, y, label_smoothing=s, reduction="none")
        got = soft_target_loss(logits, one_hot, s, multi_target=False)
        assert torch.allclose(got, expected, atol=1e-6)
    q = torch.softmax(torch.randn(6, 8, generator=g), 1)
    log_p = torch.log_softmax(logits, 1)
    smoothed = 0.8 * q + 0.2 / 8
    got = soft_target_loss(logits, q, 0.2, multi_target=False)
    assert torch.allclose(got, -(smoothed * log_p).sum(1), atol=1e-6)
    # multi_target: -log max_k t_k p_k, t = 1 on the accepted classes, 0.001 elsewhere
    accepted = torch.zeros(6, 8)
    accepted[:, 1], accepted[:3, 4] = 0.5, 0.5
    accepted[3:, 1] = 1.0
    p = log_p.exp()
    t = torch.where(accepted > 0, 1.0, 0.001)
    expected = -torch.log((t * p).amax(1))
    assert torch.allclose(soft_target_loss(logits, accepted, 0, True), expected, atol=1e-6)
    assert torch.allclose(
        soft_target_loss(logits, accepted, 0.2, True),
        0.8 * expected - 0.2 * log_p.mean(1),
        atol=1e-6,
    )
    # class weights: an image weighs its distribution's mean weight; hard targets unchanged
    w = torch.arange(1.0, 9.0)
    loss = EmoNeXtLoss(0.2, 0.0, class_weights=w)
    weighted = (soft_target_loss(logits, q, 0.2, False) * (q @ w)).mean()
    assert torch.allclose(loss(logits, None, q), weighted)
    assert torch.equal(loss(logits, None, one_hot), loss(logits, None, one_hot))
    assert torch.allclose(loss(logits, None, one_hot), loss(logits, None, y), atol=1e-6)


@pytest.mark.parametrize(
    "mode, sampler",
    [("crossentropy", "shuffle"), ("crossentropy", "balanced"), ("probability", "shuffle")],
)
def test_soft_mode_runs_resume_exactly(synthetic_root, tmp_path, mode, sampler):
    import train

    root = soft_copy(synthetic_root, tmp_path / "data", mode, keep=4)
    out = tmp_path / "runs"
    common = FAST + ["--dataset-path", str(root), "--output-dir", str(out), "--sampler", sampler,
                     "--loss-weighting", "inverse-frequency"]  # fmt: skip
    assert_resume_is_exact(lambda argv: train.main(train.parse_args(argv)), common, out)
    assert torch.load(out / "split" / "last.pt", weights_only=True)["label_mode"] == mode


def test_a_multi_target_run_and_a_resume_on_another_modes_data(synthetic_root, tmp_path):
    import train

    root = soft_copy(synthetic_root, tmp_path / "data", "multi_target", keep=4)
    common = FAST + ["--dataset-path", str(root), "--output-dir", str(tmp_path / "runs"),
                     "--run-name", "r"]  # fmt: skip
    results = train.main(train.parse_args([*common, "--epochs", "1"]))
    assert np.isfinite(results["test_accuracy"])
    last = tmp_path / "runs" / "r" / "last.pt"
    assert torch.load(last, weights_only=True)["label_mode"] == "multi_target"
    other = soft_copy(synthetic_root, tmp_path / "other", "crossentropy", keep=4)
    with pytest.raises(SystemExit, match="trains in FER\\+ mode crossentropy, the run in multi"):
        train.main(train.parse_args([*common, "--dataset-path", str(other), "--epochs", "2",
                                     "--resume", str(last)]))  # fmt: skip
