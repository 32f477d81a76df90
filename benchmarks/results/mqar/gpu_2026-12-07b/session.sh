#!/usr/bin/env bash
# The MQAR device session prepared 2026-12-07, 08:00 UTC, run 09:05-09:32 UTC (README.md here): the script
# of the 2026-12-07 session again, for what that session's one short call left. Its header says how to call it
# (`first SECONDS`, then `go SECONDS`; carry runs/carry). Its step 1, Based, d_model 64, seq 2048, lr 1e-3, now
# resumes from the checkpoint after epoch 56 in runs/carry: 8 epochs, about 1 minute.
exec bash "$(dirname "$0")/../gpu_2026-12-07/session.sh" "$@"
