#!/usr/bin/env bash
# Installs the text-to-speech engines that render the synthetic training corpus
# (espeak-ng, flite, festival with its kal_diphone voice) when they are missing, with
# apt-get. Never fails: without apt-get, root or sudo, or with SQ_PT2E_SKIP_APT=1, it
# says which engines are missing and what installs them; the tests that need an engine
# are then skipped with that reason, and everything else works without them.
set -u

packages=()
command -v espeak-ng >/dev/null 2>&1 || packages+=(espeak-ng)
command -v flite >/dev/null 2>&1 || packages+=(flite)
command -v text2wave >/dev/null 2>&1 || packages+=(festival festvox-kallpc16k)
[ ${#packages[@]} -eq 0 ] && exit 0

hint="apt-get install ${packages[*]}"
if [ "${SQ_PT2E_SKIP_APT:-0}" = 1 ]; then
  echo "sq-pt2e: TTS engines missing (SQ_PT2E_SKIP_APT=1, not installing): $hint"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "sq-pt2e: TTS engines missing and no apt-get on this system; install by hand: ${packages[*]}"
  exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "sq-pt2e: TTS engines missing and no root or password-less sudo; run: sudo $hint"
    exit 0
  fi
fi
echo "sq-pt2e: installing the TTS engines of the synthetic corpus: ${packages[*]}"
log=$(mktemp)
if timeout 600 "${sudo[@]}" apt-get update -qq >"$log" 2>&1 \
  && DEBIAN_FRONTEND=noninteractive timeout 900 "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
       "${packages[@]}" >>"$log" 2>&1; then
  echo "sq-pt2e: installed ${packages[*]}"
else
  echo "sq-pt2e: apt-get could not install ${packages[*]} (last lines below); the tests that need them are skipped"
  tail -n 5 "$log"
fi
rm -f "$log"
exit 0
