"""Data analysis: shares, duplicates and coverage of query and example sets."""
