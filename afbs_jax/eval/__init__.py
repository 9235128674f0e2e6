"""Evaluation: sliding-window perplexity of any model that maps tokens to logits, and long-context task
accuracy (greedy answers, exact match, the paired McNemar test)."""

from afbs_jax.eval.perplexity import PerplexityResult as PerplexityResult
from afbs_jax.eval.perplexity import Window as Window
from afbs_jax.eval.perplexity import corpus_token_ids as corpus_token_ids
from afbs_jax.eval.perplexity import perplexity as perplexity
from afbs_jax.eval.perplexity import perplexity_with_stats as perplexity_with_stats
from afbs_jax.eval.perplexity import sliding_windows as sliding_windows
from afbs_jax.eval.perplexity import token_nll as token_nll
from afbs_jax.eval.tasks import Accuracy as Accuracy
from afbs_jax.eval.tasks import PairedTest as PairedTest
from afbs_jax.eval.tasks import accuracy as accuracy
from afbs_jax.eval.tasks import generate_predictions as generate_predictions
from afbs_jax.eval.tasks import is_correct as is_correct
from afbs_jax.eval.tasks import mcnemar as mcnemar
from afbs_jax.eval.tasks import normalize as normalize
from afbs_jax.eval.tasks import score_predictions as score_predictions
from afbs_jax.eval.tasks import score_samples as score_samples
