"""Evaluation: sliding-window perplexity of any model that maps tokens to logits."""

from afbs_jax.eval.perplexity import PerplexityResult as PerplexityResult
from afbs_jax.eval.perplexity import Window as Window
from afbs_jax.eval.perplexity import corpus_token_ids as corpus_token_ids
from afbs_jax.eval.perplexity import perplexity as perplexity
from afbs_jax.eval.perplexity import perplexity_with_stats as perplexity_with_stats
from afbs_jax.eval.perplexity import sliding_windows as sliding_windows
from afbs_jax.eval.perplexity import token_nll as token_nll
