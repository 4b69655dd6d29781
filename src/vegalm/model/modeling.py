"""Models: the bare encoder and its MLM, RTD and sequence-classification variants.

    from vegalm.model import VegaForSequenceClassification
    model = VegaForSequenceClassification.from_pretrained("runs/demo/discriminator", num_labels=2)
    out = model(input_ids, attention_mask=mask, labels=y)   # out.loss, out.logits

All of them read and write the transformers DebertaV2 checkpoint format (model/hf.py),
and take the same forward arguments as the HF classes, so code written for
`AutoModelForSequenceClassification` (the fine-tuning tricks) runs on them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from vegalm.model.config import EncoderConfig
from vegalm.model.encoder import Embeddings, Encoder, init_weights
from vegalm.model.heads import ContextPooler, MLMHead, RTDHead
from vegalm.model.unpad import Packing


class VegaPreTrained(nn.Module):
    """Shared loading/saving. Subclasses set `hf_architecture` and build their heads in __init__."""

    hf_architecture = "DebertaV2Model"
    base_prefix = "deberta."  # where the encoder lives in task-model checkpoints

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        init_weights(self, self.config.initializer_range)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs):
        from vegalm.model.hf import load_pretrained

        return load_pretrained(cls, path, **kwargs)

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        from vegalm.model.hf import save_pretrained

        save_pretrained(self, path, **kwargs)

    def hf_config_extra(self) -> dict:
        return {}

    def get_input_embeddings(self) -> nn.Module:
        """The word-embedding module (task models keep the encoder under `deberta`)."""
        return self.deberta.embeddings.word_embeddings

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        skip = set()
        if exclude_embeddings:
            skip = {id(p) for n, p in self.named_parameters() if "embeddings" in n}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


class VegaModel(VegaPreTrained):
    """The bare encoder (HF `DebertaV2Model`). Returns `BaseModelOutput`."""

    base_prefix = ""

    def __init__(self, config: EncoderConfig, init: bool = True):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.unpad = False  # True: layers skip padding tokens (model/unpad.py; same outputs at real tokens)
        if init:
            self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **_,
    ) -> BaseModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        # pad=None means "no padding anywhere": the kernels then skip masking entirely.
        pad = None
        if attention_mask is not None and not bool(attention_mask.all()):
            pad = attention_mask.bool()
        x = self.embeddings(input_ids, token_type_ids, position_ids, attention_mask, inputs_embeds)
        packing = Packing(pad) if self.unpad and pad is not None else None
        h, states = self.encoder(x, pad, output_hidden_states, packing)
        return BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states) if states else None)


class _LMPredictions(nn.Module):
    """Holder so that the head's names are `lm_predictions.lm_head.*`, the DeBERTa checkpoint layout."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.lm_head = MLMHead(config)


class VegaForMaskedLM(VegaPreTrained):
    """Encoder + tied MLM head (the RTD generator, or a plain MLM baseline).

    With `labels`, logits are computed only at positions whose label is not -100 (the
    masked ones, ~15%): the full-vocabulary projection is the most expensive matmul of a
    small model, so this is ~6x less head work. `logits` is then [N_masked, V] and
    `masked_positions` holds the flat indices. Pass `full_logits=True` for [B, L, V].
    """

    hf_architecture = "DebertaV2ForMaskedLM"

    def __init__(self, config: EncoderConfig, init: bool = True):
        super().__init__(config)
        self.deberta = VegaModel(config, init=False)
        self.lm_predictions = _LMPredictions(config)
        if init:
            self.init_weights()

    def hf_config_extra(self) -> dict:
        return {"legacy": False}

    def forward(self, input_ids=None, attention_mask=None, labels=None, full_logits: bool = False, **kw):
        out = self.deberta(input_ids, attention_mask, **kw)
        h = out.last_hidden_state
        emb = self.deberta.embeddings.word_embeddings.weight
        head = self.lm_predictions.lm_head
        if labels is None or full_logits:
            logits = head(h, emb)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        sel = (labels.flatten() != -100).nonzero().squeeze(-1)
        logits = head(h.flatten(0, 1).index_select(0, sel), emb)
        target = labels.flatten().index_select(0, sel)
        loss = F.cross_entropy(logits.float(), target) if sel.numel() else logits.sum() * 0.0
        res = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        res["masked_positions"] = sel
        return res


class VegaForRTD(VegaPreTrained):
    """Encoder + replaced-token-detection head: the ELECTRA / DeBERTa-v3 discriminator.

    Exported for transformers as a bare `DebertaV2Model`; the head is saved beside it
    (`rtd_head.safetensors`) so pretraining can continue from the export.
    """

    hf_architecture = "DebertaV2Model"

    def __init__(self, config: EncoderConfig, init: bool = True):
        super().__init__(config)
        self.deberta = VegaModel(config, init=False)
        self.mask_predictions = RTDHead(config)
        if init:
            self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw) -> TokenClassifierOutput:
        out = self.deberta(input_ids, attention_mask, **kw)
        logits = self.mask_predictions(out.last_hidden_state)  # [B, L]
        loss = None
        if labels is not None:
            w = attention_mask.to(logits.dtype) if attention_mask is not None else torch.ones_like(logits)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), weight=w.float(), reduction="sum")
            loss = loss / w.sum().clamp_min(1)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class VegaForSequenceClassification(VegaPreTrained):
    """Encoder + pooled [CLS] head. num_labels == 1 means regression (MSE), as in HF."""

    hf_architecture = "DebertaV2ForSequenceClassification"

    def __init__(self, config: EncoderConfig, num_labels: int = 2, init: bool = True):
        super().__init__(config)
        self.num_labels = num_labels
        self.deberta = VegaModel(config, init=False)
        self.pooler = ContextPooler(config)
        p = config.cls_dropout if config.cls_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        if init:
            self.init_weights()

    def hf_config_extra(self) -> dict:
        return {
            "num_labels": self.num_labels,
            "id2label": {str(i): f"LABEL_{i}" for i in range(self.num_labels)},
            "label2id": {f"LABEL_{i}": i for i in range(self.num_labels)},
            "problem_type": "regression" if self.num_labels == 1 else "single_label_classification",
        }

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kw) -> SequenceClassifierOutput:
        out = self.deberta(input_ids, attention_mask, **kw)
        logits = self.classifier(self.dropout(self.pooler(out.last_hidden_state)))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
