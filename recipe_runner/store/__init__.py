"""The store: the content-addressed cache of stage outputs (cache, hashing), the lock file, and
publishing generations into output directories (publish), over small filesystem helpers (fsutil)."""
