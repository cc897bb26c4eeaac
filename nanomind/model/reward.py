"""A reward model: the transformer plus a scalar head `score` read at each row's last token.

The layout of transformers' *ForSequenceClassification with num_labels=1 (a `score` matrix on the final hidden
state of the last real token). Trained on preference pairs by `nanomind reward train` (Bradley-Terry loss), used
by GRPO as `--reward model:CKPT`. A checkpoint with a `score.weight` loads as this class (checkpoint.load_model).
"""

from __future__ import annotations

from torch import nn

from nanomind.model.config import ModelConfig
from nanomind.model.layers import Linear
from nanomind.model.transformer import Transformer


class RewardModel(Transformer):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.score = Linear(cfg.hidden_size, 1)
        nn.init.normal_(self.score.weight, 0.0, cfg.initializer_range)
