"""Pipeline stages; each is a small module with pure inputs and a file-system output."""
