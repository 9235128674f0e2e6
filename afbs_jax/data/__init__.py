"""Corpora for calibration and evaluation (`load_corpus(name)` -> `Corpus` with disjoint train/validation/test)
and the long-context tasks generated from them (`make_samples(task, length_tokens, ...)` -> `Sample`s)."""

from afbs_jax.data.corpora import CORPUS_NAMES as CORPUS_NAMES
from afbs_jax.data.corpora import Corpus as Corpus
from afbs_jax.data.corpora import CorpusUnavailableError as CorpusUnavailableError
from afbs_jax.data.corpora import bundled_records as bundled_records
from afbs_jax.data.corpora import load_corpus as load_corpus
from afbs_jax.data.corpora import shakespeare_plays as shakespeare_plays
from afbs_jax.data.corpora import sotu_addresses as sotu_addresses
from afbs_jax.data.corpora import split_characters as split_characters
from afbs_jax.data.corpora import split_documents as split_documents
from afbs_jax.data.tasks import TASKS as TASKS
from afbs_jax.data.tasks import Sample as Sample
from afbs_jax.data.tasks import make_samples as make_samples
