"""What the on-policy loop refuses before it starts (ConfigError), and the cross-tokenizer map.

- :func:`check_config`: a combination without a teacher signal, or a rollout size below 1;
- :func:`cross_tokenizer_map`: the prepared data's vocabulary map (a teacher with another
  tokenizer), and the algorithms that can use it;
- :func:`check_images`: image-text prompts need an image-text student and teacher (both see
  the images), and no cross-tokenizer pair. The refusal's reason: the on-policy bridge
  re-tokenizes the sampled response and aligns the two tokenizations by their text
  (:class:`~kubedistill.crosstok.bridge.TokenizerBridge`); a prompt's image blocks have no
  text and each processor expands them to its own number and layout of tokens, so there is
  nothing to align them by.
"""

from __future__ import annotations

from kubedistill.config import Config
from kubedistill.errors import ConfigError


def is_on_policy(cfg: Config) -> bool:
    return cfg.rollout.rollout_num_engines > 0


def check_config(cfg: Config) -> None:
    """Refuse combinations the on-policy loop cannot honour (ConfigError)."""
    from kubedistill.algorithms import ALGORITHMS

    kd = cfg.kd
    if not ALGORITHMS.lookup(kd.kd_algorithm).needs_teacher or kd.kd_ratio <= 0:
        raise ConfigError(f"on-policy training needs a teacher signal: kd_algorithm "
                          f"'{kd.kd_algorithm}' with kd_ratio {kd.kd_ratio} has none")
    if cfg.rollout.n_samples_per_prompt < 1 or cfg.rollout.rollout_batch_size < 1 \
            or cfg.rollout.generate_max_len < 1 or kd.teacher_forward_n_batches < 1:
        raise ConfigError("rollout_batch_size, n_samples_per_prompt, generate_max_len and "
                          "teacher_forward_n_batches must be >= 1")


def cross_tokenizer_map(cfg: Config):
    """The prepared data's vocabulary map when the teacher has another tokenizer (prepare
    writes one only then), else None; ConfigError for a combination that cannot use it."""
    from kubedistill import storage
    from kubedistill.crosstok.vocab import VOCAB_MAP_FILE, VocabMap
    from kubedistill.data.preflight import CROSS_TOKENIZER_ALGORITHMS

    if not storage.exists(storage.join(cfg.prepared_path, VOCAB_MAP_FILE)):
        return None
    if cfg.kd.self_distillation or cfg.kd.kd_algorithm not in CROSS_TOKENIZER_ALGORITHMS:
        raise ConfigError(f"{cfg.prepared_path} was prepared for a teacher with another "
                          f"tokenizer: on-policy KD then needs kd_algorithm one of "
                          f"{', '.join(CROSS_TOKENIZER_ALGORITHMS)} and no self_distillation "
                          f"(got '{cfg.kd.kd_algorithm}')")
    return VocabMap.load(cfg.prepared_path)


def check_images(has_images: bool, cross_tokenizer: bool, student_path: str,
                 teacher_path: str) -> None:
    """Refuse what on-policy KD cannot do with image-text models (see the module doc)."""
    from kubedistill.vlm.model import is_image_text

    vlm = {"student": is_image_text(student_path), "teacher": is_image_text(teacher_path)}
    if cross_tokenizer and (has_images or any(vlm.values())):
        raise ConfigError(
            "on-policy KD between image-text models with different tokenizers is not "
            "supported: the sampled response is re-tokenized and aligned to the teacher's "
            "tokens by its text, and image blocks have no text to align by (each processor "
            "expands an image to its own tokens); use a teacher with the student's tokenizer "
            "(or self-distillation), or off-policy KD")
    if not has_images:
        return
    for role, path in (("student", student_path), ("teacher", teacher_path)):
        if not vlm[role]:
            raise ConfigError(f"the prepared prompts carry images but the {role} {path} is "
                              "not an image-text model (its config.json has no "
                              "vision_config): on-policy KD with images needs both to see them")
