"""Find every problem in a split before a long run: `tools/check_data.py` or `data.check=true`."""

from __future__ import annotations

import torch

from crnn.config import DataConfig, ModelConfig
from crnn.data.collate import ctc_min_frames
from crnn.data.records import LineRecords
from crnn.data.samples import Preprocess, read_sample
from crnn.data.vocab import Vocab
from crnn.models import build_model
from crnn.runlog import progress


def check_records(records: LineRecords, data_cfg: DataConfig, model_cfg: ModelConfig,
                  vocab: Vocab | None = None, purpose: str = "train", show_progress: bool = False) -> list[str]:
    """Every problem of `records`, one message each naming the file/line: entries left out when
    loading, images that do not decode, texts needing more CTC frames than their line gives,
    characters outside `vocab` (the training vocabulary; default: the split's own). Each line is made
    into a sample as `purpose` ("train" or "evaluate") makes it."""
    problems = list(records.problems)
    known = vocab or Vocab.from_texts(records.texts)
    model = build_model(model_cfg, len(known))
    preprocess = Preprocess.from_config(data_cfg)
    for index in progress(range(len(records)), records.name, show_progress):
        sample = read_sample(records, index, known, preprocess, purpose)
        if sample.image is None:
            problems.append(sample.error)
            continue
        where, text, width = records.ids[index], records.texts[index], sample.image.shape[-1]
        frames = int(model.output_lengths(torch.tensor([width]))[0])
        needed = ctc_min_frames(sample.target)
        if frames < needed:
            problems.append(f"{where}: {len(text)} characters need {needed} CTC frames, but the line "
                            f"({width} px wide at height {data_cfg.height}) gives {frames}; it is skipped")
        unknown = known.unknown(text)
        if unknown:
            effect = "left out of the training target" if purpose == "train" else "counted as errors"
            problems.append(f"{where}: characters {''.join(sorted(unknown))!r} are not in the vocab ({effect})")
    return problems
