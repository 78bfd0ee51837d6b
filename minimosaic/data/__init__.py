"""Text in, batches of token ids out: four rooms, in the order a run walks through them.

- `sources`: the text (a UTF-8 file, a named dataset downloaded once into the data directory);
- `stories`: the embedded "stories" corpus, written by minimosaic itself from a seed;
- `tokenizers`: characters, a BPE trained on the text, or a stock tiktoken encoding, each rebuilt
  exactly from its `spec()`;
- `batches`: the encoded ids (cached), the training / validation splits, and the batches.

Every name is importable from `minimosaic.data` as before the split.
"""
from . import stories, tokenizers
from .batches import (EVAL_SEED, VAL_FRACTION, BatchSampler, check_split_lengths, encode_dataset,
                      eval_batches, sequential_batches)
from .sources import (DATASETS, EMBEDDED, Dataset, dataset_path, default_data_dir, download_dataset,
                      list_datasets, load_text, read_text_file, user_cache_dir)
from .stories import generate_stories
from .tokenizers import (BPE_SAMPLE_CHARS, PAT_STR, BPETokenizer, CharTokenizer, TiktokenTokenizer,
                         Tokenizer, build_tokenizer, tokenizer_from_spec, train_bpe)

# two private names that tests/test_data.py reaches for as `data._NAMES` and `data._merge_pair`
_NAMES = stories._NAMES
_merge_pair = tokenizers._merge_pair

__all__ = [
    # sources
    "DATASETS", "EMBEDDED", "Dataset", "dataset_path", "default_data_dir", "download_dataset",
    "list_datasets", "load_text", "read_text_file", "user_cache_dir",
    # stories
    "generate_stories",
    # tokenizers
    "BPE_SAMPLE_CHARS", "PAT_STR", "BPETokenizer", "CharTokenizer", "TiktokenTokenizer", "Tokenizer",
    "build_tokenizer", "tokenizer_from_spec", "train_bpe",
    # batches
    "EVAL_SEED", "VAL_FRACTION", "BatchSampler", "check_split_lengths", "encode_dataset", "eval_batches",
    "sequential_batches",
]
