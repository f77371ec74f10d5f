"""Task types beyond text generation and sequence classification, one module each."""
