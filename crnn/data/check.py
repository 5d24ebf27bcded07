"""Find every problem in a split before a long run: `tools/check_data.py` or `data.check=true`."""

from __future__ import annotations

import torch
from tqdm import tqdm

from crnn.config import DataConfig, ModelConfig
from crnn.data.collate import ctc_min_frames
from crnn.data.sources import LineRecords
from crnn.data.transforms import resize_line
from crnn.data.vocab import Vocab
from crnn.errors import DataError
from crnn.models import build_model


def check_records(records: LineRecords, data_cfg: DataConfig, model_cfg: ModelConfig,
                  vocab: Vocab | None = None, show_progress: bool = False) -> list[str]:
    """Every problem of `records`, one message each naming the file/line: entries left out when
    loading (empty or malformed transcriptions, missing images), images that do not decode, lines
    whose text needs more CTC frames than the model gives their width, characters outside `vocab`.
    """
    problems = list(records.problems)
    model = build_model(model_cfg, len(vocab) if vocab else 2)
    for index in tqdm(range(len(records)), desc=records.name, disable=not show_progress, leave=False):
        where, text = records.ids[index], records.texts[index]
        try:
            image = records.image(index)
        except DataError as err:
            problems.append(str(err))
            continue
        width = resize_line(image, data_cfg.height, data_cfg.resize, data_cfg.width,
                            data_cfg.max_width).shape[-1]
        frames = int(model.output_lengths(torch.tensor([width]))[0])
        labels = [vocab.index[c] for c in text if c in vocab.index] if vocab else [ord(c) for c in text]
        needed = ctc_min_frames(labels)
        if frames < needed:
            problems.append(f"{where}: {len(text)} characters need {needed} CTC frames, but the line "
                            f"({width} px wide at height {data_cfg.height}) gives {frames}; it is skipped")
        unknown = vocab.unknown(text) if vocab else set()
        if unknown:
            problems.append(f"{where}: characters {''.join(sorted(unknown))!r} are not in the vocab "
                            f"(they count as errors)")
    return problems
