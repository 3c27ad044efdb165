"""A reward model that scores the mean of an encoder's token states instead of its [CLS] pooler.

Sentence-transformers backbones such as all-MiniLM-L6-v2 were trained to mean their token states; the [CLS]
state and BERT's pooler on top of it were not trained for that, so a fresh linear score reads a weaker summary
of the dialogue there. `apo-ray rm pooling=mean` builds this class; the checkpoint it writes is an HF directory
whose config.json says `apo_ray_pooling: mean`, and apo_ray.modeling.load_reward_model rebuilds it from that
(plain transformers cannot: it is not an HF class).
"""

from __future__ import annotations

import torch
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

# config.json's key naming the pooling a checkpoint was trained with; absent means the HF class's own.
POOLING_KEY = "apo_ray_pooling"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean over each row's unmasked positions of `hidden` [rows, tokens, width]: padding changes nothing."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class MeanPooledForSequenceClassification(PreTrainedModel):
    """Any `AutoModel` encoder (its config decides which) and one linear score on its mean token state."""

    config_class = PretrainedConfig
    # Without it HF builds the encoder with eager attention: a MiniLM training step of 16 pairs took 1.7x the
    # native head's (quiet, 2 threads), with it 0.97x. An encoder that has no SDPA fails to build.
    _supports_sdpa = True
    # PreTrainedModel.base_model returns this attribute, as the critic's per-token values expect.
    base_model_prefix = "encoder"

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        setattr(config, POOLING_KEY, "mean")
        self.encoder = AutoModel.from_config(config)
        if getattr(self.encoder, "pooler", None) is not None:
            # BERT's [CLS] pooler is not read: without it no weight sits outside the graph (DeepSpeed, the
            # loader's missing-weights check) and a checkpoint without one loads.
            self.encoder.pooler = None
        self.score = torch.nn.Linear(config.hidden_size, 1)
        self.post_init()

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """As PreTrainedModel's, refusing a checkpoint whose weights do not fill the encoder: HF would leave
        those layers randomly initialised with a warning, and the RM would train or score from noise."""
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        missing = sorted(key for key in info["missing_keys"] if key.startswith(f"{cls.base_model_prefix}."))
        if missing:
            raise ValueError(
                f"{path}: pooling=mean needs an encoder checkpoint (all-MiniLM-L6-v2, bert-base-uncased) or an RM "
                f"saved with pooling=mean, but {len(missing)} encoder weights are not in it ({missing[0]}, ...)"
            )
        return model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SequenceClassifierOutput(logits=self.score(masked_mean(hidden, attention_mask)))
