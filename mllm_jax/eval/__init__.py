"""SID evaluation: constrained beam search over the SID trie and MiniOneRec ranking metrics."""
