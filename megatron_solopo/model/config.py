"""The `model` section of an experiment config."""

from __future__ import annotations

import dataclasses

ATTENTION_BACKENDS = ("auto", "te", "sdpa", "local")
DTYPES = ("fp32", "bf16", "fp16")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
RECOMPUTE = ("none", "selective", "full")


@dataclasses.dataclass(frozen=True)
class LogprobHeadConfig:
    """How the response-only LM head trades memory for compute (`model.logprob_head` in YAML).

    The head computes log-probs only at response positions, in chunks; the defaults suit any length.
    """

    chunk_tokens: int = 2048
    """Response positions per output-layer call: the fp32 logits of one chunk, chunk_tokens x V/tp
    x 4 bytes (1 GiB at 2048 x 128K), bound the head's working memory."""
    recompute: bool = True
    """Recompute each chunk's logits in the backward instead of keeping their fp32 softmax
    (chunk x V/tp) for every chunk until the backward; costs one extra output-layer matmul over the
    response rows only."""

    def __post_init__(self) -> None:
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"model.logprob_head.chunk_tokens must be a positive integer, got {self.chunk_tokens!r}")


@dataclasses.dataclass
class ModelConfig:
    """Which model to build and how it computes (precision, kernels, recomputation)."""

    preset: str = "tiny"
    """Architecture preset name (see `solopo env --presets`); ignored only when `hf_model` is set,
    in which case the architecture is read from its config.json and this must stay the default."""
    hf_model: str | None = None
    """Hugging Face checkpoint directory to start from (converted on load); None = random init."""
    checkpoint: str | None = None
    """Megatron-Core distributed checkpoint to start from (from `solopo convert hf-to-mcore`)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to `hf_model`, or the tokenizer saved with `checkpoint`."""
    attention_backend: str = "auto"
    """auto (te on CUDA with Transformer Engine, else sdpa) | te | sdpa (torch SDPA + ring attention,
    runs on CPU and GPU) | local (Megatron's unfused attention; a baseline, O(s^2) memory). On a GPU with
    TE, auto with params_dtype fp32 is refused (TE has no fused fp32 attention): use bf16 there."""
    params_dtype: str = "fp32"
    """Weights/compute dtype: fp32 | bf16 | fp16. bf16 trains with fp32 master weights in the optimizer."""
    fp8: str | None = None
    """FP8 linear layers through Transformer Engine: hybrid | e4m3 | null. Needs attention_backend=te."""
    fp8_recipe: str = "delayed"
    """TE FP8 scaling recipe: delayed | tensorwise | mxfp8 | blockwise. Sequences are padded to its token
    multiple per rank (16, 16, 32, 128); mxfp8 needs Blackwell (refused on Hopper at model build)."""
    recompute: str = "none"
    """Activation recomputation: none | selective (core attention) | full (whole layers)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recomputed block (uniform method)."""
    logprob_head: LogprobHeadConfig = dataclasses.field(default_factory=LogprobHeadConfig)
    """The response-only LM head's memory/compute trade-off (chunk_tokens, recompute); the same for
    training and the reference pass."""
    init_seed: int = 1234
    """Seed for random initialization. The weights are identical for any TP size (full master
    weights are drawn on the CPU and split); a different PP size draws the layers in another order,
    so a random-init run at PP=2 does not start from the PP=1 weights (load a checkpoint for that)."""

    def __post_init__(self) -> None:
        for name, value, allowed in (("attention_backend", self.attention_backend, ATTENTION_BACKENDS),
                                     ("params_dtype", self.params_dtype, DTYPES),
                                     ("fp8_recipe", self.fp8_recipe, FP8_RECIPES),
                                     ("recompute", self.recompute, RECOMPUTE)):
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"model.fp8={self.fp8!r} is not one of {', '.join(FP8_FORMATS)} (or null)")
        if self.fp8 is not None and self.attention_backend in ("sdpa", "local"):
            raise ValueError(f"model.fp8={self.fp8} needs Transformer Engine: set model.attention_backend=te "
                             "(or auto on a CUDA machine with TE), or model.fp8=null")
        if self.recompute_num_layers < 1:
            raise ValueError("model.recompute_num_layers must be >= 1")
        if self.hf_model and self.checkpoint:
            raise ValueError("set one of model.hf_model and model.checkpoint, not both")
