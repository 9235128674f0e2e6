"""The Llama model package: config, NNX modules, attention policies, loaders and calibration capture.

Public API: `LlamaConfig`; `Llama` (call it on int tokens for float32 logits, `with_attention(policy)`
to swap attention); the policies `DenseAttention`, `SpargeAttention`, `TunedAttention`,
`BlockMaskAttention` (defined in `afbs_jax.attention`);
`build_model` (Hugging Face-named tensors -> Llama) and `init_random`; the loaders `load_hf` and
`load_gguf` (each `(path, ...) -> (model, tokenizer)`) with `default_gguf_path`; `iter_layer_qkv`,
the per-layer Q/K/V capture the tuner calibrates on; and generation: `generate` (greedy or top-p, batched,
stop tokens; `GenerationStats` with `return_stats`) on `Llama.prefill` / `Llama.decode` with their
functional `KVCache` (`init_cache`), and its halves `prefill_prompts` / `decode_from_cache`.
"""

from afbs_jax.model.attention import BlockMaskAttention as BlockMaskAttention
from afbs_jax.model.attention import DenseAttention as DenseAttention
from afbs_jax.model.attention import SpargeAttention as SpargeAttention
from afbs_jax.model.attention import TunedAttention as TunedAttention
from afbs_jax.model.cache import KVCache as KVCache
from afbs_jax.model.cache import init_cache as init_cache
from afbs_jax.model.capture import iter_layer_qkv as iter_layer_qkv
from afbs_jax.model.config import LlamaConfig as LlamaConfig
from afbs_jax.model.gguf_loader import default_gguf_path as default_gguf_path
from afbs_jax.model.generation import GenerationStats as GenerationStats
from afbs_jax.model.generation import decode_from_cache as decode_from_cache
from afbs_jax.model.generation import generate as generate
from afbs_jax.model.generation import prefill_prompts as prefill_prompts
from afbs_jax.model.gguf_loader import load_gguf as load_gguf
from afbs_jax.model.hf_loader import load_hf as load_hf
from afbs_jax.model.llama import Llama as Llama
from afbs_jax.model.tokenizer import Tokenizer as Tokenizer
from afbs_jax.model.weights import build_model as build_model
from afbs_jax.model.weights import init_random as init_random

