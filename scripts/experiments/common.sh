# Sourced by the experiment wrappers (compare.sh, scaling.sh): set 'root', build
# the release tree when its binaries are missing, and set 'py' to a python3 that
# imports matplotlib (installing python3-matplotlib when none does; the plots are
# skipped, not the runs, when that fails). $1: the wrapper's name, for messages.
exp_find_py() {
  local c
  # python3-matplotlib is for Debian's interpreter (/usr/bin/python3), which need
  # not be the python3 on the PATH (pyenv, a virtualenv): use one that has it.
  for c in python3 /usr/bin/python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import matplotlib' 2>/dev/null; then
      py=$c
      return 0
    fi
  done
  return 1
}

exp_setup() {
  local name=$1
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  if [ ! -x "$root/build/bin/pstrain" ] || [ ! -x "$root/build/bin/psserver" ]; then
    echo "$name: building the release tree (build/)" >&2
    "$root/scripts/build.sh" build -DCMAKE_BUILD_TYPE=Release
  fi
  py=python3
  if ! exp_find_py; then
    echo "$name: matplotlib missing; installing python3-matplotlib" >&2
    if ! { "$root/scripts/install-deps.sh" python3-matplotlib && exp_find_py; }; then
      echo "$name: no python3 with matplotlib; the plots will be skipped" >&2
      py=python3
    fi
  fi
}
