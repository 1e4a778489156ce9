#!/usr/bin/env bash
# Run one benchmark on two revisions of this repository, alternating, in one session:
#
#   bench/side_by_side.sh REV ROUNDS bench/refinement.py --runs 3
#
# REV is checked out into a temporary git worktree; the current tree runs as "new". Both use this
# repository's .venv. Each round runs old then new (then new then old on the next round), so drift
# in machine load affects both alike. Prints each run's output under a header.
set -euo pipefail
rev="$1"; rounds="$2"; shift 2
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$root/.venv/bin/python"
old="$(mktemp -d /tmp/side-by-side-XXXXXX)"
trap 'git -C "$root" worktree remove --force "$old" >/dev/null 2>&1 || rm -rf "$old"' EXIT
git -C "$root" worktree add --detach -q "$old" "$rev"
echo "# side by side: old = $(git -C "$root" rev-parse --short "$rev"), new = $(git -C "$root" rev-parse --short HEAD) (+ working tree); $rounds round(s) of: $*"
for ((i = 1; i <= rounds; i++)); do
  if (( i % 2 )); then order=(old new); else order=(new old); fi
  for which in "${order[@]}"; do
    dir="$root"; [[ "$which" == old ]] && dir="$old"
    echo; echo "## round $i: $which"
    (cd "$dir" && "$python" "$@")
  done
done
