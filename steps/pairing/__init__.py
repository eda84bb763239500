"""From labels to pairs: ``aggregate`` (signals → one preference), ``pairs`` (chosen/rejected per
prompt), ``consistency`` (the rules that decide whether a pair is kept, each drop with a reason)."""
