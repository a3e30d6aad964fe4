"""reqpmctl: the command-line client of reqpmd."""
