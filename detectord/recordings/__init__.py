"""Recordings: the `.drec` file format (format), `detectord record` (recorder), `detectord replay`
(replay), offline scoring through the serving code path (scoring) and the lab's ground truth
beside a recording (truth)."""
