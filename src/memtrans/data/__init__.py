"""Data layer: corpora, splits, tokenisers, the on-disk token cache and the document stream.

    bundle = prepare_data(cfg.data, seed)          # DataBundle(tokenizer, splits, info)
    stream = DocumentStream(bundle.splits["train"], cfg.data.batch_size, cfg.model.segment_len, seed)
    for batch in stream: ...                       # Batch(tokens, targets, loss_mask, new_doc, ...)

See docs/CONTRACTS.md and the module docstrings (corpus, recall, tokenizer, stream, fetch).
"""
from memtrans.data.corpus import (BUILTIN, FETCHED, Document, default_cache_dir, load_corpus, read_text_file,
                                  split_documents)
from memtrans.data.fetch import fetch_corpus, fetch_main
from memtrans.data.prepare import DataBundle, TokenizedDocs, prepare_data
from memtrans.data.recall import generate_recall_corpus, generate_recall_document, recall_info
from memtrans.data.stream import Batch, DocumentStream
from memtrans.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, get_tokenizer

__all__ = ["BUILTIN", "FETCHED", "Document", "default_cache_dir", "load_corpus", "read_text_file", "split_documents",
           "fetch_corpus", "fetch_main", "DataBundle", "TokenizedDocs", "prepare_data", "generate_recall_corpus",
           "generate_recall_document", "recall_info", "Batch", "DocumentStream", "BPETokenizer", "ByteTokenizer",
           "Tokenizer", "get_tokenizer"]
