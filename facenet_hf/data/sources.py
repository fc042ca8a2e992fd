"""Face data sources -> one ``datasets.Dataset`` schema, with labels read from Arrow (no image decoding).

Every source becomes a Dataset with four columns:

- ``image``: ``datasets.Image(decode=False)``, rows ``{"bytes": ..., "path": ...}`` (decode with
  ``facenet_hf.data.images.load_image``);
- ``label``: int64, dense ``0..C-1``, ordered by sorted identity name;
- ``identity``: the person's name (str);
- ``path``: for an image folder the path relative to its root (``Aaron_Eckhart/Aaron_Eckhart_0001.jpg``);
  otherwise the image's own path where the source stores one, else ``""``.

Source kinds, detected in this order:

1. an existing directory laid out as ``<root>/<Identity>/<image>`` (LFW's ``lfw-deepfunneled``, VGGFace2's
   ``n000002/0001_01.jpg``): the Dataset is built straight from the sorted file list (no image is opened, so
   millions of files take seconds; the table lives in memory, ~100 bytes a file);
2. a ``.parquet`` file, a glob (``data/*.parquet``) or a directory holding parquet files:
   ``datasets.load_dataset("parquet", ...)``;
3. anything else is taken for a Hugging Face Hub dataset id: ``datasets.load_dataset(source, split=split)``.

With ``labels_file=`` the source is an image folder of any layout and the labels come from that file
(:func:`labels_file_dataset`): CelebA's ``identity_CelebA.txt`` (``000001.jpg 2880`` per line, fields separated
by spaces or tabs, no header), or a ``.csv`` / ``.tsv`` file with a header row naming a path and an identity
column. File names are relative to the folder (absolute ones are taken as they are); ``path`` is the name as
written.

Several sources train together through :func:`combine_sources`: labels offset so that the sources' label spaces
are disjoint, identities prefixed ``<source name>:`` (so two sources' ``"2880"`` never merge), and a ``source``
column naming each row's source (``""`` for the unprefixed first one).

For parquet and Hub sources the columns are mapped by name (see :data:`IMAGE_COLUMNS`, :data:`LABEL_COLUMNS`, or
pass ``image_column`` / ``label_column`` / ``name_column``). Identity names come from a ``ClassLabel``'s names,
from a string label column, or from ``name_column``; bare integer labels without names are named ``str(value)``
and ordered by value.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Features, Value
from datasets import Image as ImageFeature
from datasets.table import InMemoryTable

__all__ = [
    "IMAGE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "LABELS_FILE_IDENTITY_COLUMNS",
    "LABELS_FILE_PATH_COLUMNS",
    "LABEL_COLUMNS",
    "SOURCE_COLUMN",
    "SOURCE_FEATURES",
    "SourceError",
    "arrow_column",
    "combine_sources",
    "folder_dataset",
    "labels_file_dataset",
    "labels_of",
    "load_source",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""File extensions (case-insensitive) that an image folder source picks up."""

IMAGE_COLUMNS: tuple[str, ...] = ("image", "img", "jpg", "png", "face")
"""Column names tried, in order, for the image of a parquet / Hub source."""

LABEL_COLUMNS: tuple[str, ...] = ("label", "labels", "identity", "person", "name", "class", "id")
"""Column names tried, in order, for the identity label of a parquet / Hub source."""

LABELS_FILE_PATH_COLUMNS: tuple[str, ...] = (
    "path",
    "file",
    "filename",
    "file_name",
    "image",
    "image_id",
    "image_path",
    "img",
)
"""Header names tried, in order (case-insensitive), for the image file column of a .csv / .tsv labels file."""

LABELS_FILE_IDENTITY_COLUMNS: tuple[str, ...] = (
    "identity",
    "identity_id",
    "label",
    "person",
    "name",
    "subject",
    "class",
    "id",
)
"""Header names tried, in order (case-insensitive), for the identity column of a .csv / .tsv labels file."""

SOURCE_COLUMN = "source"
"""The column :func:`combine_sources` adds: the name of each row's source (``""`` for an unprefixed one)."""

SOURCE_FEATURES = Features(
    {
        "image": ImageFeature(decode=False),
        "label": Value("int64"),
        "identity": Value("string"),
        "path": Value("string"),
    }
)
"""The schema every :func:`load_source` result has."""

_FOLDER_LAYOUT = "<root>/<Identity>/<image>" + "{" + ",".join(IMAGE_EXTENSIONS) + "}"
_GLOB_CHARS = frozenset("*?[")


class SourceError(ValueError):
    """A data source that cannot be used as asked; the message names the source and what would be valid."""


def load_source(
    source: str | os.PathLike,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    name_column: str | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    labels_file: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Load an image folder, parquet file(s) or Hub dataset as ``image, label, identity, path`` (see module doc).

    ``split`` applies to Hub datasets and parquet directories with split-named files (``train-*.parquet``);
    an explicit parquet file or glob is read whole. ``cache_dir`` is passed to ``datasets.load_dataset``.
    Column options apply to parquet and Hub sources; with ``labels_file`` (``source`` is then an image folder)
    ``image_column`` / ``label_column`` name a .csv / .tsv labels file's path and identity columns.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if labels_file is not None:
        if name_column is not None:
            raise SourceError(
                f"data source {text!r}: name_column does not apply to a labels file (its identity column holds "
                "the names); use label_column to choose that column"
            )
        return labels_file_dataset(path, labels_file, path_column=image_column, identity_column=label_column)
    if path.is_dir():
        files = _scan_image_folder(path)
        if files is not None:
            return folder_dataset(path, *files)
        parquet = sorted(str(p) for p in path.rglob("*.parquet") if not _hidden(p.relative_to(path)))
        if not parquet:
            raise SourceError(_no_layout_message(path))
        ds = _load(
            text,
            lambda: datasets.load_dataset("parquet", data_dir=str(path), split=split, cache_dir=cache_dir),
        )
    elif text.endswith(".parquet") or _GLOB_CHARS & set(text):
        files = sorted(glob.glob(str(path), recursive=True)) if _GLOB_CHARS & set(text) else [str(path)]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise FileNotFoundError(
                f"data source {text!r}: no such parquet file (or no file matches the glob)"
            )
        ds = _load(
            text,
            lambda: datasets.load_dataset(
                "parquet", data_files={"train": files}, split="train", cache_dir=cache_dir
            ),
        )
    elif path.exists():
        raise SourceError(
            f"data source {text!r} is a file but not a .parquet file; expected an image folder ({_FOLDER_LAYOUT}), "
            "a .parquet file, a glob of parquet files, a folder of parquet files, or a Hub dataset id"
        )
    elif text.startswith(("/", "./", "../", "~")) or text.count("/") > 1:
        raise FileNotFoundError(
            f"data source {text!r}: no such file or directory (and it is not a Hub dataset id like 'owner/name')"
        )
    else:
        ds = _load(text, lambda: datasets.load_dataset(text, split=split, cache_dir=cache_dir), hub=True)
    return _normalise(ds, text, image_column=image_column, label_column=label_column, name_column=name_column)


def labels_of(ds: datasets.Dataset) -> np.ndarray:
    """The ``label`` column as an int64 numpy array, read from Arrow (no image is decoded; fast for millions)."""
    if "label" not in ds.column_names:
        raise KeyError(
            f"dataset has no 'label' column (columns: {ds.column_names}); load it with load_source()"
        )
    return arrow_column(ds, "label").to_numpy().astype(np.int64, copy=False)


def arrow_column(ds: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """Column ``name`` as Arrow, honouring a ``select``/``shuffle`` indices mapping; no image is decoded.

    ``datasets``' own getters (``ds[name]``, ``with_format("numpy")``) go row by row: ~100x-10000x slower on
    millions of rows.
    """
    col = ds.data.column(name)
    indices = getattr(ds, "_indices", None)
    if indices is not None:
        col = col.take(indices.column(0))
    return col


# --------------------------------------------------------------------------------------------- image folders


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _scan_image_folder(root: Path) -> tuple[list[str], list[str], list[int]] | None:
    """(identity names, relative file paths, images per identity) of ``root/<Identity>/<image>``; None if none."""
    names: list[str] = []
    rel: list[str] = []
    counts: list[int] = []
    with os.scandir(root) as it:
        subdirs = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    for name in subdirs:
        with os.scandir(root / name) as it:
            files = sorted(
                e.name
                for e in it
                if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()
            )
        if files:
            names.append(name)
            counts.append(len(files))
            rel.extend(f"{name}/{f}" for f in files)
    return (names, rel, counts) if names else None


def _no_layout_message(root: Path) -> str:
    hint = ""
    with os.scandir(root) as it:
        subdirs = sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
    for name in subdirs[:20]:
        try:
            found = _scan_first_level_images(root / name)
        except OSError:
            continue
        if found:
            hint = f"; did you mean {str(root / name)!r}? it holds identity folders with images"
            break
    return (
        f"image folder {str(root)!r} has no identity subfolders with images (and no parquet files): expected "
        f"{_FOLDER_LAYOUT}, e.g. lfw-deepfunneled/Aaron_Eckhart/Aaron_Eckhart_0001.jpg{hint}"
    )


def _scan_first_level_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        for sub in it:
            if sub.name.startswith(".") or not sub.is_dir():
                continue
            with os.scandir(sub.path) as files:
                if any(f.name.lower().endswith(IMAGE_EXTENSIONS) for f in files):
                    return True
    return False


def folder_dataset(root: Path, names: list[str], rel: list[str], counts: list[int]) -> datasets.Dataset:
    """The source dataset of an image folder from its listing, no file opened: ``names[i]`` is identity ``i``,
    whose ``counts[i]`` files come next in ``rel`` (paths relative to ``root``, grouped by identity)."""
    root_abs = os.path.abspath(root)
    n = len(rel)
    rel_arr = pa.array(rel, pa.string())
    abs_arr = pc.binary_join_element_wise(root_abs + os.sep, rel_arr, "")
    image = pa.StructArray.from_arrays(
        [pa.nulls(n, pa.binary()), abs_arr],
        fields=[pa.field("bytes", pa.binary()), pa.field("path", pa.string())],
    )
    labels = np.repeat(np.arange(len(names), dtype=np.int64), counts)
    identity = pa.array(names, pa.string()).take(pa.array(labels))
    table = pa.table({"image": image, "label": pa.array(labels), "identity": identity, "path": rel_arr})
    digest = hashlib.sha256(root_abs.encode())
    digest.update("\n".join(rel).encode("utf-8", "surrogateescape"))
    return _from_table(table, fingerprint=digest.hexdigest()[:32])


def _from_table(table: pa.Table, *, fingerprint: str) -> datasets.Dataset:
    table = table.cast(SOURCE_FEATURES.arrow_schema)
    return datasets.Dataset(
        InMemoryTable(table),
        info=datasets.DatasetInfo(features=SOURCE_FEATURES.copy()),
        fingerprint=fingerprint,
    )


# -------------------------------------------------------------------------------------------- labels files


def labels_file_dataset(
    root: str | os.PathLike,
    labels_file: str | os.PathLike,
    *,
    path_column: str | None = None,
    identity_column: str | None = None,
) -> datasets.Dataset:
    """The source dataset of an image folder labelled by ``labels_file`` (no image is opened).

    Formats, by the file's suffix: ``.csv`` (comma) and ``.tsv`` (tab) have a header row; the path column is
    ``path_column`` or the first of :data:`LABELS_FILE_PATH_COLUMNS` in it, the identity column
    ``identity_column`` or the first of :data:`LABELS_FILE_IDENTITY_COLUMNS`. Any other suffix (CelebA's
    ``identity_CelebA.txt``) is one ``file identity`` pair per line, separated by spaces or tabs, no header.
    Blank lines are skipped. Identities are text; labels are dense, ordered by identity (numerically when every
    identity is a whole number, as CelebA's are, else by name). Every listed file must exist under ``root`` and
    be listed once: a bad line, a missing file or a file listed twice raises :class:`SourceError` naming the
    labels file, the line and the file.
    """
    root = Path(root).expanduser()
    labels_path = Path(labels_file).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data source {str(root)!r}: no such image folder (the folder that labels file {str(labels_path)!r} "
            "names its images relative to)"
        )
    try:
        raw = labels_path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"labels file {str(labels_path)!r} does not exist") from None
    except IsADirectoryError:
        raise SourceError(f"labels file {str(labels_path)!r} is a folder, not a file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SourceError(
            f"labels file {str(labels_path)!r}, line {line}: not UTF-8 text ({exc.reason}); save it as UTF-8"
        ) from None
    suffix = labels_path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        entries = _read_table_labels(
            text, labels_path, "," if suffix == ".csv" else "\t", path_column, identity_column
        )
    else:
        entries = _read_pair_labels(text, labels_path)
    if not entries:
        raise SourceError(f"labels file {str(labels_path)!r} lists no images")
    files = _check_listed_files(root, labels_path, entries)
    names = [identity for _, _, identity in entries]
    labels, identity = _dense_identities(names)
    root_abs = os.path.abspath(root)
    rel_arr = pa.array([written for _, written, _ in entries], pa.string())
    image = pa.StructArray.from_arrays(
        [pa.nulls(len(entries), pa.binary()), pa.array(files, pa.string())],
        fields=[pa.field("bytes", pa.binary()), pa.field("path", pa.string())],
    )
    table = pa.table({"image": image, "label": pa.array(labels), "identity": identity, "path": rel_arr})
    digest = hashlib.sha256(f"{root_abs}\n{os.path.abspath(labels_path)}\n".encode())
    digest.update(raw)
    return _from_table(table, fingerprint=digest.hexdigest()[:32])


def _pair_format(path: Path) -> str:
    return (
        f"labels file {str(path)!r} is read as one 'file identity' pair per line (CelebA's identity_CelebA.txt: "
        "'000001.jpg 2880'), separated by spaces or tabs, no header; a .csv / .tsv file has a header naming its "
        "columns"
    )


def _read_pair_labels(text: str, path: Path) -> list[tuple[int, str, str]]:
    """``(line number, file, identity)`` of a whitespace-separated ``file identity`` labels file."""
    out: list[tuple[int, str, str]] = []
    for no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise SourceError(
                f"labels file {str(path)!r}, line {no}: expected 2 fields 'file identity', got {len(fields)}: "
                f"{line!r}; {_pair_format(path)}"
            )
        name, identity = fields
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            header = " (a header line? this format has none)" if no == 1 else ""
            raise SourceError(
                f"labels file {str(path)!r}, line {no}: {name!r} is not an image file name (expected one of "
                f"{', '.join(IMAGE_EXTENSIONS)}){header}: {line!r}; {_pair_format(path)}"
            )
        out.append((no, name, identity))
    return out


def _read_table_labels(
    text: str, path: Path, delimiter: str, path_column: str | None, identity_column: str | None
) -> list[tuple[int, str, str]]:
    """``(line number, file, identity)`` of a .csv / .tsv labels file with a header row."""
    kind = "CSV" if delimiter == "," else "TSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    out: list[tuple[int, str, str]] = []
    try:
        for row in reader:
            no = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                p_col = _labels_column(
                    header, path_column, LABELS_FILE_PATH_COLUMNS, "image_column", path, "path"
                )
                i_col = _labels_column(
                    header, identity_column, LABELS_FILE_IDENTITY_COLUMNS, "label_column", path, "identity"
                )
                if p_col == i_col:
                    raise SourceError(
                        f"labels file {str(path)!r}: the path and identity columns are both {header[p_col]!r}; "
                        "pass image_column= and label_column= naming two columns"
                    )
                continue
            if len(row) != len(header):
                raise SourceError(
                    f"labels file {str(path)!r}, line {no}: {len(row)} fields, but the header (columns "
                    f"{header}) has {len(header)}: {delimiter.join(row)!r}"
                )
            name, identity = row[p_col].strip(), row[i_col].strip()
            if not name or not identity:
                empty = header[p_col] if not name else header[i_col]
                raise SourceError(f"labels file {str(path)!r}, line {no}: column {empty!r} is empty")
            out.append((no, name, identity))
    except csv.Error as exc:
        raise SourceError(
            f"labels file {str(path)!r}, line {reader.line_num}: not valid {kind}: {exc}"
        ) from None
    if header is None:
        raise SourceError(
            f"labels file {str(path)!r} is empty: expected a header row, then one row per image"
        )
    return out


def _labels_column(
    header: list[str],
    explicit: str | None,
    candidates: Sequence[str],
    option: str,
    path: Path,
    what: str,
) -> int:
    if explicit is not None:
        if explicit not in header:
            raise SourceError(
                f"labels file {str(path)!r} has no column {explicit!r} ({option}); its header has {header}"
            )
        return header.index(explicit)
    lower = [h.lower() for h in header]
    for cand in candidates:
        if cand in lower:
            return lower.index(cand)
    raise SourceError(
        f"labels file {str(path)!r}: no {what} column in its header {header}; expected one of {list(candidates)} "
        f"or pass {option}=<column name>"
    )


def _check_listed_files(root: Path, labels_path: Path, entries: list[tuple[int, str, str]]) -> list[str]:
    """The absolute path of every listed file; SourceError for a file listed twice or missing under ``root``.

    Each folder named is listed once (``os.scandir``), not every file stat-ed: fast for a flat folder of many files.
    """
    first_line: dict[str, int] = {}
    files: list[str] = []
    root_abs = os.path.abspath(root)
    for no, name, _ in entries:
        full = os.path.normpath(os.path.join(root_abs, os.path.expanduser(name)))
        if full in first_line:
            raise SourceError(
                f"labels file {str(labels_path)!r}, line {no}: image {name!r} is listed again (first on line "
                f"{first_line[full]}); list every image once"
            )
        first_line[full] = no
        files.append(full)
    present: dict[str, set[str] | None] = {}
    missing: list[tuple[int, str]] = []
    for (no, name, _), full in zip(entries, files, strict=True):
        folder, base = os.path.split(full)
        if folder not in present:
            try:
                with os.scandir(folder) as it:
                    present[folder] = {e.name for e in it if e.is_file()}
            except OSError:
                present[folder] = None
        names = present[folder]
        if names is None or base not in names:
            missing.append((no, name))
    if missing:
        no, name = missing[0]
        more = (
            f" ({len(missing)} of the {len(entries)} listed images are missing)" if len(missing) > 1 else ""
        )
        raise SourceError(
            f"labels file {str(labels_path)!r}, line {no}: image {name!r} does not exist under {root_abs}{more}; "
            "file names are relative to the image folder (data.train_source / an extra source's path)"
        )
    return files


def _dense_identities(names: list[str]) -> tuple[np.ndarray, pa.Array]:
    """(dense labels, identity per row): ordered numerically when every name is a whole number, else by name."""
    arr = pa.array(names, pa.string())
    encoded = arr.dictionary_encode()
    dictionary = encoded.dictionary.to_pylist()
    if all(n.isascii() and n.isdigit() for n in dictionary):
        keys = sorted(range(len(dictionary)), key=lambda i: (int(dictionary[i]), dictionary[i]))
    else:
        keys = sorted(range(len(dictionary)), key=lambda i: dictionary[i])
    order = np.asarray(keys, dtype=np.int64)
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    labels = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return labels, encoded.dictionary.take(pa.array(order)).take(pa.array(labels))


# ---------------------------------------------------------------------------------------- several sources


def combine_sources(parts: Sequence[tuple[str | None, datasets.Dataset]]) -> datasets.Dataset:
    """One training dataset from several sources with disjoint label spaces.

    ``parts`` is ``(name, dataset)`` per source, each with dense labels ``0..C_i-1`` (a :func:`load_source`
    result, possibly filtered): source ``i``'s labels are offset by ``C_0 + ... + C_{i-1}``, its identities
    prefixed ``name:`` (``None``: kept as they are), and a ``source`` column holds ``name`` (or ``""``). No
    image is read.
    """
    if not parts:
        raise ValueError("combine_sources: no sources given")
    names = [n for n, _ in parts if n is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"combine_sources: source names must be unique, got {names}")
    out: list[datasets.Dataset] = []
    offset = 0
    for name, ds in parts:
        for col in ("image", "label", "identity", "path"):
            if col not in ds.column_names:
                raise KeyError(
                    f"source {name!r} has no {col!r} column (columns: {ds.column_names}); load it with load_source()"
                )
        labels = arrow_column(ds, "label").to_numpy().astype(np.int64)
        count = int(labels.max()) + 1 if labels.size else 0
        identity = arrow_column(ds, "identity").cast(pa.string())
        if name is not None:
            identity = pc.binary_join_element_wise(f"{name}:", identity, "")
        base = hashlib.sha256(f"{getattr(ds, '_fingerprint', '')}|{name}|{offset}".encode()).hexdigest()[:32]
        part = ds.select_columns(["image", "path"])
        if getattr(part, "_indices", None) is not None:  # a filtered source: add_column needs a flat table
            part = _quietly(lambda part=part, fp=base + "f": part.flatten_indices(new_fingerprint=fp))
        part = part.add_column("label", labels + offset, feature=Value("int64"), new_fingerprint=base + "l")
        part = part.add_column(
            "identity", identity.combine_chunks(), feature=Value("string"), new_fingerprint=base + "n"
        )
        part = part.add_column(
            SOURCE_COLUMN,
            pa.array([name or ""] * len(ds), pa.string()),
            feature=Value("string"),
            new_fingerprint=base + "s",
        )
        out.append(part.select_columns(["image", "label", "identity", "path", SOURCE_COLUMN]))
        offset += count
    return out[0] if len(out) == 1 else datasets.concatenate_datasets(out)


def _quietly(fn):
    """``fn()`` without ``datasets``' progress bars (a table operation of a second is not worth a bar)."""
    if datasets.are_progress_bars_disabled():
        return fn()
    datasets.disable_progress_bars()
    try:
        return fn()
    finally:
        datasets.enable_progress_bars()


# ------------------------------------------------------------------------------------------- parquet / Hub


def _load(text: str, fn, *, hub: bool = False) -> datasets.Dataset:
    try:
        ds = fn()
    except (FileNotFoundError, SourceError):
        raise
    except Exception as exc:  # re-raised with the source named
        kind = "Hugging Face Hub dataset" if hub else "parquet data"
        extra = (
            " (it is not an existing folder or .parquet file, so it was taken for a Hub dataset id; "
            "offline, a Hub dataset must already be in the datasets cache)"
            if hub
            else ""
        )
        raise SourceError(
            f"could not load data source {text!r} as {kind}{extra}: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):  # not expected with split=..., but be explicit
        raise SourceError(f"data source {text!r} gave several splits {list(ds)}; pass split=")
    return ds


def _pick(
    columns: Sequence[str], explicit: str | None, candidates: Sequence[str], option: str, text: str
) -> str | None:
    """The explicit column (which must exist), else the first candidate present (case-insensitive), else None."""
    if explicit is not None:
        if explicit not in columns:
            raise SourceError(
                f"data source {text!r} has no column {explicit!r} ({option}); its columns are {list(columns)}"
            )
        return explicit
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _missing(
    what: str, option: str, candidates: Sequence[str], columns: Sequence[str], text: str
) -> SourceError:
    return SourceError(
        f"data source {text!r} has no {what} column: its columns are {list(columns)}; expected one of "
        f"{list(candidates)} or pass {option}=<column name>"
    )


def _normalise(
    ds: datasets.Dataset,
    text: str,
    *,
    image_column: str | None,
    label_column: str | None,
    name_column: str | None,
) -> datasets.Dataset:
    columns = ds.column_names
    img_col = _pick(columns, image_column, IMAGE_COLUMNS, "image_column", text)
    if img_col is None:
        raise _missing("image", "image_column", IMAGE_COLUMNS, columns, text)
    name_col = _pick(columns, name_column, (), "name_column", text) if name_column else None
    lab_col = _pick(columns, label_column, [c for c in LABEL_COLUMNS if c != img_col], "label_column", text)
    if lab_col is None:
        if name_col is None:
            raise _missing("label", "label_column", LABEL_COLUMNS, columns, text)
        lab_col = name_col
    if lab_col == img_col:
        raise SourceError(f"data source {text!r}: the label column {lab_col!r} is also the image column")

    labels, identity = _dense_labels(ds, lab_col, name_col, text)
    paths = _image_paths(ds, img_col, text)

    out = ds.select_columns([img_col])
    base = hashlib.sha256(
        f"{getattr(ds, '_fingerprint', '')}|{img_col}|{lab_col}|{name_col}".encode()
    ).hexdigest()[:32]
    out = out.cast_column(img_col, ImageFeature(decode=False), new_fingerprint=base + "i")
    if img_col != "image":
        out = out.rename_column(img_col, "image")
    out = out.add_column("label", labels, feature=Value("int64"), new_fingerprint=base + "l")
    out = out.add_column("identity", identity, feature=Value("string"), new_fingerprint=base + "n")
    out = out.add_column("path", paths, feature=Value("string"), new_fingerprint=base + "p")
    return out


def _image_paths(ds: datasets.Dataset, col: str, text: str) -> pa.Array:
    """The ``path`` strings of an image column that ``Image`` can cast from (Image, {bytes, path}, bytes, paths).

    The column itself is then cast with ``cast_column``: Arrow keeps the (memory-mapped) image bytes in place.
    """
    feature = ds.features[col]
    arr = arrow_column(ds, col)
    kind = arr.type
    if isinstance(feature, ImageFeature) or (
        pa.types.is_struct(kind) and {"bytes", "path"} <= {f.name for f in kind}
    ):
        return pc.fill_null(pc.struct_field(arr, "path").cast(pa.string()), "").combine_chunks()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return pa.array([""] * len(arr), pa.string())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pc.fill_null(arr.cast(pa.string()), "").combine_chunks()
    raise SourceError(
        f"data source {text!r}: image column {col!r} has type {feature}; expected an Image feature, "
        "a {bytes, path} struct, encoded image bytes, or file paths"
    )


def _dense_labels(
    ds: datasets.Dataset, lab_col: str, name_col: str | None, text: str
) -> tuple[np.ndarray, pa.Array]:
    """(dense int64 labels ordered by sorted identity name, identity name per row)."""
    feature = ds.features[lab_col]
    arr = arrow_column(ds, lab_col)
    if arr.null_count:
        raise SourceError(f"data source {text!r}: label column {lab_col!r} has {arr.null_count} empty values")
    if name_col is not None and name_col != lab_col:
        names = arrow_column(ds, name_col)
        if not (pa.types.is_string(names.type) or pa.types.is_large_string(names.type)):
            raise SourceError(
                f"data source {text!r}: name column {name_col!r} has type {ds.features[name_col]}; expected strings"
            )
        if names.null_count:
            raise SourceError(
                f"data source {text!r}: name column {name_col!r} has {names.null_count} empty values"
            )
        labels, identity = _dense_from_strings(names.cast(pa.string()))
        by_label = _dense_from_any(arr, feature, lab_col, text)[0]
        _check_one_to_one(labels, by_label, arr, identity, (lab_col, name_col), text)
        return labels, identity
    return _dense_from_any(arr, feature, lab_col, text)


def _dense_from_any(arr: pa.ChunkedArray, feature, col: str, text: str) -> tuple[np.ndarray, pa.Array]:
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return _dense_from_strings(arr.cast(pa.string()))
    if not pa.types.is_integer(arr.type):
        raise SourceError(
            f"data source {text!r}: label column {col!r} has type {feature}; expected integers, a ClassLabel, "
            "or identity names (strings); pass label_column= to choose another column"
        )
    values = arr.to_numpy().astype(np.int64, copy=False)
    uniq, inverse = np.unique(values, return_inverse=True)
    if isinstance(feature, ClassLabel):
        bad = uniq[(uniq < 0) | (uniq >= feature.num_classes)]
        if bad.size:
            raise SourceError(
                f"data source {text!r}: label column {col!r} holds {bad[:5].tolist()}, outside its ClassLabel "
                f"range 0..{feature.num_classes - 1}"
            )
        names = np.array([feature.names[i] for i in uniq], dtype=object)
    else:
        names = np.array([str(v) for v in uniq], dtype=object)
        return inverse.astype(np.int64), pa.array(names, pa.string()).take(pa.array(inverse))
    order = np.argsort(names, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    labels = rank[inverse].astype(np.int64)
    return labels, pa.array(names[order].tolist(), pa.string()).take(pa.array(labels))


def _dense_from_strings(arr: pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    encoded = arr.combine_chunks().dictionary_encode()
    dictionary = np.array(encoded.dictionary.to_pylist(), dtype=object)
    order = np.argsort(dictionary, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    labels = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    return labels, encoded.dictionary.take(pa.array(order)).take(pa.array(labels))


def _check_one_to_one(
    by_name: np.ndarray,
    by_label: np.ndarray,
    raw: pa.ChunkedArray,
    names: pa.Array,
    cols: tuple[str, str],
    text: str,
) -> None:
    """Each label value must carry one name and each name one label value; else name an example of the clash."""
    combos = np.unique(np.stack([by_name, by_label], axis=1), axis=0)
    lab_col, name_col = cols
    for side in (0, 1):
        keys, counts = np.unique(combos[:, side], return_counts=True)
        if not (counts > 1).any():
            continue
        clash = combos[combos[:, side] == keys[counts > 1][0]]
        rows = [int(np.flatnonzero((by_name == a) & (by_label == b))[0]) for a, b in clash[:5]]
        seen = [(raw[r].as_py(), names[r].as_py()) for r in rows]
        raise SourceError(
            f"data source {text!r}: columns {lab_col!r} and {name_col!r} do not name the same identities "
            f"one-to-one: ({lab_col}, {name_col}) combinations {seen}"
        )


def keep_rows(ds: datasets.Dataset, keep: np.ndarray, *, tag: str) -> datasets.Dataset:
    """Rows ``keep`` of ``ds`` (Arrow ``select``, no image read), ``label`` re-densified to ``0..C'-1`` when an
    identity lost all its rows; ``tag`` names the operation in the new fingerprint."""
    old = arrow_column(ds, "label").to_numpy()
    uniq, dense = np.unique(old[keep], return_inverse=True)
    if uniq.size == np.unique(old).size and uniq.size and uniq[-1] == uniq.size - 1:
        return ds.select(keep)  # every identity survives and labels are already dense
    new_label = np.full(len(ds), -1, dtype=np.int64)
    new_label[keep] = dense
    columns = ds.column_names
    fingerprint = f"{getattr(ds, '_fingerprint', 'ds')}-{tag}"
    relabelled = ds.remove_columns("label").add_column(
        "label", new_label, feature=datasets.Value("int64"), new_fingerprint=fingerprint[:60] + "-l"
    )
    return relabelled.select_columns(columns).select(keep)
