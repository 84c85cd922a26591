"""Data: tokenizers, the synthetic NLU corpus, SNIPS, Shakespeare roles, Dixon et al.'s toxicity
bias sets, BOLD's prompts, the gendered-profession corpus, TFDS sources and padded batching."""

from trustjax.data.bold import BOLD_DOMAINS, BoldPrompts, load_bold
from trustjax.data.batching import gather_batch, num_batches, pad_indices, padded_batches
from trustjax.data.corpus import TextDataset
from trustjax.data.shakespeare import (RoleCorpus, fetch_shakespeare, lm_examples,
                                       load_shakespeare, parse_play)
from trustjax.data.professions import PROFESSIONS, gendered_professions
from trustjax.data.snips import SNIPS_INTENTS, load_snips
from trustjax.data.synthetic import INTENTS, synthetic_nlu
from trustjax.data.tfds_source import TEXT_DATASETS, load_tfds_text
from trustjax.data.toxicity import IDENTITY_TERMS, load_madlibs, load_wiki_toxicity
from trustjax.data.tokenizers import (Tokenizer, build_char_tokenizer, build_hash_tokenizer,
                                      build_word_tokenizer, word_split)
