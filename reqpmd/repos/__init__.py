"""dnf repositories of succeeded builds: one per chroot under repo_dir, kept by
createrepo_c, updated in batches under a file lock, swapped atomically for readers."""
