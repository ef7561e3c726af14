"""Teacher-student agreement measured on the training tokens (on-policy diagnostics)."""

from __future__ import annotations

import torch

from kubedistill.algorithms.base import Algorithm, MicroBatch
from kubedistill.crosstok.vocab import VocabMap


class WithDiagnostics(Algorithm):
    """The configured algorithm plus three detached parts, normalised like the loss (by Z):

        kl_ts = sum_r KL(p_T,r || p_S,r) / Z      top1 = sum_r [argmax p_T,r == argmax p_S,r] / Z
        rows  = |R| / Z

    at temperature 1 over the compared rows R, so ``kl_ts / rows`` is the mean per-token KL.
    Same tokenizer: R is every loss token (rows = N / Z) and the distributions are over the
    shared vocabulary. Cross-tokenizer (``vocab_map`` given, a batch with ``extras``
    ``ct_student_index`` / ``ct_teacher_index``): R is the aligned pairs and both sides are
    renormalised over the K mapped ids, as :class:`~kubedistill.algorithms.simple_ctkd.SimpleCTKD`
    compares them.
    """

    def __init__(self, inner: Algorithm, chunk: int | None = 1024,
                 vocab_map: VocabMap | None = None):
        super().__init__(inner.config)
        self.inner = inner
        self.chunk = chunk or 1 << 30
        self._map = None if vocab_map is None else (vocab_map.student_ids,
                                                    vocab_map.teacher_ids)

    @property
    def teacher_head(self):  # the inner algorithm owns it
        return self.inner.teacher_head

    @teacher_head.setter
    def teacher_head(self, value):
        if value is not None:
            raise AttributeError("set the inner algorithm's teacher_head")

    def param_groups(self) -> list[dict]:
        return self.inner.param_groups()

    def forward(self, batch: MicroBatch, hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                normalizer: float) -> dict[str, torch.Tensor]:
        parts = self.inner(batch, hidden, lm_head_weight, normalizer)
        head = self.inner.teacher_head
        if batch.teacher_hidden is None or head is None:
            return parts
        with torch.no_grad():
            s_rows, t_rows, s_cols, t_cols = self._compared(batch, hidden)
            kl = top1 = torch.zeros((), dtype=torch.float64, device=hidden.device)
            w = lm_head_weight.float() if s_cols is None else \
                lm_head_weight.index_select(0, s_cols.to(hidden.device)).float()
            if t_cols is not None:
                head = head.select(t_cols)
            for lo in range(0, s_rows.shape[0], self.chunk):
                s = torch.log_softmax(s_rows[lo:lo + self.chunk].float() @ w.T, dim=-1)
                t = head.logits(t_rows[lo:lo + self.chunk].to(hidden.device))
                t = torch.log_softmax(t.float(), dim=-1)
                v = min(s.shape[-1], t.shape[-1])
                s, t = s[:, :v], t[:, :v]
                kl = kl + (t.exp() * (t - s)).sum().double()
                top1 = top1 + (t.argmax(-1) == s.argmax(-1)).sum().double()
            rows = torch.tensor(float(s_rows.shape[0]), dtype=torch.float64)
        dtype = parts["loss"].dtype
        return {**parts, "kl_ts": (kl / normalizer).to(dtype), "top1": (top1 / normalizer).to(dtype),
                "rows": (rows / normalizer).to(device=hidden.device, dtype=dtype)}

    def _compared(self, batch: MicroBatch, hidden: torch.Tensor):
        """(student rows, teacher rows, student ids, teacher ids) that are compared."""
        s_idx = batch.extras.get("ct_student_index")
        if self._map is None or s_idx is None:
            return hidden, batch.teacher_hidden, None, None
        t_idx = batch.extras["ct_teacher_index"]
        return (hidden.index_select(0, s_idx.to(hidden.device)),
                batch.teacher_hidden.index_select(0, t_idx.to(batch.teacher_hidden.device)),
                self._map[0], self._map[1])
