"""Captioned image data for training: parquet shards, an image folder with captions, or a `datasets` folder.

Every source gives random access `dataset[i] -> Sample(image, caption, score)`; images are decoded on access, so a
large source is not held in memory (parquet is read one row group at a time, arrow files are memory-mapped).
`prepare_image` resizes and crops as the paper and the reference do, and returns the micro-conditions.
"""

from __future__ import annotations

import glob
import io
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_SCORE = 6.0  # the aesthetic micro-condition when the data has none (the reference's fixed value)


class DataError(ValueError):
    """Training data that cannot be read, with the path and the reason."""


@dataclass
class Sample:
    image: Image.Image
    caption: str
    score: float


def open_dataset(source: str | Path, image_column: str = "image", caption_column: str | None = "caption",
                 score_column: str | None = "aesthetic_score"):
    """Pick the reader for `source`: parquet file/folder/glob, `save_to_disk` folder, or image folder.

    `caption_column=None` reads images only (captions are then empty), as tokenizer training does."""
    text = str(source)
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True))
        if not files:
            raise DataError(f"no file matches {text!r}")
        return TableDataset(files, image_column, caption_column, score_column)
    if not path.exists():
        raise DataError(f"training data {text!r} does not exist")
    if path.is_file():
        return TableDataset([path], image_column, caption_column, score_column)
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return TableDataset(_saved_dataset_files(path), image_column, caption_column, score_column)
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return TableDataset(parquet, image_column, caption_column, score_column)
    return ImageFolder(path, captions=caption_column is not None)


def _saved_dataset_files(path: Path) -> list[Path]:
    """The arrow files of a `datasets` `save_to_disk` folder (a DatasetDict uses its `train` split)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise DataError(f"{str(path)!r} is a DatasetDict without a 'train' split (splits: {splits})")
        path = path / "train"
    state = json.loads((path / "state.json").read_text())
    return [path / f["filename"] for f in state["_data_files"]]


class TableDataset:
    """Rows of parquet or arrow files: an image column (bytes, or a {bytes, path} struct) and a caption column."""

    def __init__(self, files: list[Path], image_column: str, caption_column: str, score_column: str | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.columns = (image_column,) + ((caption_column,) if caption_column else ())
        self.parts: list[tuple] = []  # (reader kind, file, row group or table, rows)
        has_score = bool(score_column)
        for file in files:
            try:
                if file.suffix == ".parquet":
                    meta = pq.ParquetFile(file)
                    names = meta.schema_arrow.names
                    groups = [(file, g, meta.metadata.row_group(g).num_rows) for g in range(meta.num_row_groups)]
                    self.parts += [("parquet", *g) for g in groups]
                else:
                    table = pa.ipc.open_stream(pa.memory_map(str(file))).read_all()
                    names = table.schema.names
                    self.parts.append(("arrow", file, table, table.num_rows))
            except (OSError, pa.ArrowException) as err:
                raise DataError(f"cannot read {str(file)!r}: {err}") from None
            for column in self.columns:
                if column not in names:
                    raise DataError(f"{str(file)!r} has no column {column!r} (columns: {', '.join(names)})")
            has_score = has_score and score_column in names
        self.score_column = score_column if has_score else None
        self.offsets = np.cumsum([0] + [p[3] for p in self.parts])
        if self.offsets[-1] == 0:
            raise DataError("the training data holds no rows")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Sample:
        part = int(np.searchsorted(self.offsets, index, side="right") - 1)
        row = index - int(self.offsets[part])
        kind, file, group, _ = self.parts[part]
        columns = list(self.columns) + ([self.score_column] if self.score_column else [])
        table = _row_group(file, group, tuple(columns)) if kind == "parquet" else group
        record = {c: table.column(c)[row].as_py() for c in columns}
        raw = record[self.columns[0]]
        data = raw.get("bytes") if isinstance(raw, dict) else raw
        if data is None and isinstance(raw, dict) and raw.get("path"):
            data = Path(raw["path"]).read_bytes()
        score = record.get(self.score_column) if self.score_column else None
        caption = str(record[self.columns[1]] or "") if len(self.columns) > 1 else ""
        return Sample(decode_image(data, f"{file}#{row}"), caption,
                      DEFAULT_SCORE if score is None else float(score))


@lru_cache(maxsize=4)
def _row_group(file: Path, group: int, columns: tuple[str, ...]):
    import pyarrow.parquet as pq

    return pq.ParquetFile(file).read_row_group(group, columns=list(columns))


class ImageFolder:
    """Images with a caption file of the same name beside each (`cat.png` + `cat.txt`), found recursively."""

    def __init__(self, root: Path, captions: bool = True):
        self.images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise DataError(f"{str(root)!r} holds no parquet, arrow or image files")
        missing = [p for p in self.images if not p.with_suffix(".txt").is_file()]
        self.captions = captions
        if missing and captions:
            raise DataError(f"{len(missing)} image(s) have no caption .txt beside them, e.g. {str(missing[0])!r}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        path = self.images[index]
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip() if self.captions else ""
        return Sample(decode_image(path.read_bytes(), str(path)), caption, DEFAULT_SCORE)


def decode_image(data: bytes | None, name: str) -> Image.Image:
    if not data:
        raise DataError(f"{name}: no image bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # PIL raises many types for broken files
        raise DataError(f"{name}: not a readable image ({err})") from None
    return ImageOps.exif_transpose(image).convert("RGB")


def prepare_image(image: Image.Image, resolution: int, generator: torch.Generator | None = None,
                  center: bool = False, crop_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the shorter side to `resolution`, crop a square of `crop_size` (default `resolution`; random unless
    `center`) -> ((3, C, C) in [0, 1], micro-conditions [orig_width, orig_height, crop_top, crop_left] as float32)."""
    width, height = image.size
    size = crop_size or resolution
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    if center:
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        top = int(torch.randint(0, new_h - size + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - size + 1, (1,), generator=generator))
    crop = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, R, R)
    return pixels, torch.tensor([width, height, top, left], dtype=torch.float32)


class SampleOrder:
    """Deterministic micro-batches: position k of rank r takes samples of a seeded permutation per epoch."""

    def __init__(self, size: int, batch: int, seed: int, rank: int, world: int):
        self.size, self.batch, self.seed, self.rank, self.world = size, batch, seed, rank, world
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.size, generator=gen))
        return self._perm[1]

    def __call__(self, micro_step: int) -> tuple[list[int], float]:
        """Dataset indices of this rank's micro-batch, and the epoch reached (fractional)."""
        start = (micro_step * self.world + self.rank) * self.batch
        positions = range(start, start + self.batch)
        return [int(self._order(p // self.size)[p % self.size]) for p in positions], start / self.size


def load_images(dataset, indices: list[int], resolution: int, gen: torch.Generator, center: bool,
                crop_size: int | None = None):
    """pixels (B, 3, C, C), micro-conditions (B, 5), captions."""
    pixels, micro, captions = [], [], []
    for index in indices:
        sample = dataset[index]
        image, cond = prepare_image(sample.image, resolution, gen, center=center, crop_size=crop_size)
        pixels.append(image)
        micro.append(torch.cat([cond, torch.tensor([sample.score])]))
        captions.append(sample.caption)
    return torch.stack(pixels), torch.stack(micro), captions


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 4099 + rank)


def read_prompts(source: str | Path, caption_column: str = "caption") -> list[str]:
    """The prompts a prompts-only run (distillation) learns from: the lines of a .txt file, or the captions of any
    source `open_dataset` reads (only the caption column is read from parquet and arrow files); empty ones dropped."""
    path = Path(str(source)).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"prompts file {str(source)!r} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        dataset = open_dataset(source, caption_column=caption_column, score_column=None)
        if isinstance(dataset, ImageFolder):
            prompts = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in dataset.images]
        else:
            prompts = []
            for kind, file, group, _ in dataset.parts:
                table = _row_group(file, group, (caption_column,)) if kind == "parquet" else group
                prompts += [str(c or "") for c in table.column(caption_column).to_pylist()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise DataError(f"{str(source)!r} holds no prompts")
    return prompts
