#!/usr/bin/env bash
# Download Meta's Llama 3 checkpoints with the presigned URL from Meta's email, resume interrupted
# transfers and verify every file against the checklist.chk that Meta publishes next to it.
# Run `./download.sh --help` for the details.

# The model table. One line per model: the name the user types, the local folder, the folder on Meta's
# server and the number of consolidated.NN.pth shards. Adding a model is adding a line here.
MODEL_TABLE='
8B             Meta-Llama-3-8B              8b_pre_trained          1
8B-instruct    Meta-Llama-3-8B-Instruct     8b_instruction_tuned    1
70B            Meta-Llama-3-70B             70b_pre_trained         8
70B-instruct   Meta-Llama-3-70B-Instruct    70b_instruction_tuned   8
'

# `sh download.sh` would fail obscurely on the first bash-only line; say what to do instead.
if [ -z "${BASH_VERSION:-}" ]; then
    echo "download.sh needs bash: run it as ./download.sh or bash download.sh" >&2
    exit 1
fi

set -euo pipefail

# ---------------------------------------------------------------------------------------------------
# Messages. Progress goes to stdout, problems to stderr, so that scripts can keep the two apart.

note() { printf '%s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    local status=$1
    shift
    printf 'ERROR: %s\n' "$@" >&2
    exit "$status"
}

usage() {
    cat <<'EOF'
Usage: ./download.sh [--help]

Downloads Meta Llama 3 model weights with the presigned URL from Meta's email, then verifies every
file against the model's checklist.chk (MD5).

Interactive use: the script asks for
  1. "Enter the URL from email:"  paste the whole link (it contains a '*');
  2. the models to download, comma-separated without spaces, from
     8B,8B-instruct,70B,70B-instruct (case-insensitive); press Enter for all of them.

Non-interactive use (scripts, CI): set these environment variables to skip the questions.
  PRESIGNED_URL         the URL from the email
  MODEL_SIZE            the list of models as above; set but empty means all of them
  TARGET_FOLDER         where to put the files (default: the current directory)
  DOWNLOAD_RETRIES      attempts per file on network errors (default: 5)
  DOWNLOAD_RETRY_DELAY  seconds to wait after the first failed attempt, then that much longer each
                        time (default: 5)

What ends up in TARGET_FOLDER:
  LICENSE, USE_POLICY
  Meta-Llama-3-8B/             (8B)
  Meta-Llama-3-8B-Instruct/    (8B-instruct)
  Meta-Llama-3-70B/            (70B)
  Meta-Llama-3-70B-Instruct/   (70B-instruct)
each with consolidated.00.pth (consolidated.00.pth ... consolidated.07.pth for 70B models),
params.json, tokenizer.model and checklist.chk.

Running it again is safe: files that already match checklist.chk are not downloaded again,
partial files are resumed, and checklist.chk is fetched afresh each time.

Needs wget or curl, and md5sum (Linux) or md5 (macOS).

Exit status: 0 when every file is downloaded and verified; 1 when a download fails, the link is
refused (expired or mistyped: request a new one), a tool is missing or a checksum does not match
(the file is kept as NAME.bad; run the script again to fetch it afresh); 2 for bad input.
The URL is never printed in full: its signature is a secret.
EOF
}

# ---------------------------------------------------------------------------------------------------
# The model table as parallel arrays (bash 3.2 on macOS has no associative arrays).

MODEL_NAMES=()
MODEL_LOCAL=()
MODEL_REMOTE=()
MODEL_SHARDS=()
while read -r name local_dir remote_dir shards; do
    [ -n "$name" ] || continue
    MODEL_NAMES+=("$name")
    MODEL_LOCAL+=("$local_dir")
    MODEL_REMOTE+=("$remote_dir")
    MODEL_SHARDS+=("$shards")
done <<<"$MODEL_TABLE"

# "8B,8B-instruct,70B,70B-instruct": the form the prompt and the error messages show.
VALID_NAMES=$(IFS=,; printf '%s' "${MODEL_NAMES[*]}")

lowercase() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

# ---------------------------------------------------------------------------------------------------
# Tools. Check them before asking anything, so nobody pastes a URL only to learn that wget is missing.

check_tools() {
    if command -v wget >/dev/null 2>&1; then
        DOWNLOADER=wget
    elif command -v curl >/dev/null 2>&1; then
        DOWNLOADER=curl
    else
        die 1 "Neither wget nor curl was found; one of them is needed to download the files." \
            "Install wget:  sudo apt-get install wget  (Debian/Ubuntu),  sudo dnf install wget  (Fedora)," \
            "               brew install wget  (macOS)."
    fi
    if command -v md5sum >/dev/null 2>&1; then
        MD5_TOOL=md5sum
    elif command -v md5 >/dev/null 2>&1; then
        MD5_TOOL=md5
    else
        die 1 "Neither md5sum nor md5 was found; one of them is needed to verify the files." \
            "Install md5sum, part of coreutils:  sudo apt-get install coreutils  (Debian/Ubuntu)," \
            "  sudo dnf install coreutils  (Fedora),  brew install coreutils  (macOS, which also has md5)."
    fi
}

# The MD5 of a file as 32 lowercase hex digits. Reading stdin keeps odd file names out of the output.
md5_of() {
    local out
    if [ "$MD5_TOOL" = md5sum ]; then
        out=$(md5sum <"$1")
    else
        out=$(md5 -q <"$1")
    fi
    lowercase "${out%% *}"
}

# ---------------------------------------------------------------------------------------------------
# The URL. It carries a signature that grants access to the weights, so it is never printed whole:
# messages show the scheme and host only, and it reaches wget and curl on stdin, not on their
# command line, where `ps` would show it to every user of the machine.

mask_url() {
    local rest=${1#*://}
    printf '%s://%s/... (rest hidden)' "${1%%://*}" "${rest%%[/?]*}"
}

# The URL of one file: the presigned URL with its '*' replaced by the file's path on the server.
file_url() {
    printf '%s%s%s' "${PRESIGNED_URL%%\**}" "$1" "${PRESIGNED_URL#*\*}"
}

check_url() {
    case $PRESIGNED_URL in
        http://*|https://*) ;;
        *) die 2 "That does not look like the URL from the email (it should start with https://)." \
                 "Copy the whole link from the email and try again." ;;
    esac
    case $PRESIGNED_URL in
        *'*'*) ;;
        *) die 2 "The URL $(mask_url "$PRESIGNED_URL") has no '*' in it, so it is not the link from the email" \
                 "or it was cut short. Copy the whole link from the email and try again." ;;
    esac
    case $PRESIGNED_URL in
        *[[:space:]]*) die 2 "The URL contains a space or a line break; copy the link from the email in one piece." ;;
    esac
}

link_refused() {
    # $1: what was being downloaded, $2: the HTTP status, or "" when unknown.
    local status=${2:+ (HTTP $2)}
    die 1 "The server refused to send $1$status." \
        "The download link has expired (links work for 24 hours and a limited number of downloads)" \
        "or was mistyped. Request a new link from Meta and run this script again with it;" \
        "files that were already downloaded and verified are kept. The link used: $(mask_url "$PRESIGNED_URL")"
}

# ---------------------------------------------------------------------------------------------------
# One transfer attempt. Every attempt continues whatever is already in the destination file, which is
# how both interrupted runs and retries after a dropped connection resume instead of starting over.
# Sets TRANSFER to ok, transient (worth retrying), refused (4xx: the link is no good) or fatal, and
# TRANSFER_DETAIL to the HTTP status or the tool's exit status.

is_transient_http() {
    case $1 in 408|429|5??) return 0 ;; *) return 1 ;; esac
}

transfer_wget() {
    local url=$1 dest=$2 rc=0 progress=
    # The progress bar is for people; in logs it is noise.
    if [ -t 1 ]; then progress=--show-progress; fi
    printf '%s\n' "$url" | wget --quiet ${progress:+"$progress"} --tries=1 --timeout=60 \
        --continue --output-document="$dest" --input-file=- || rc=$?
    TRANSFER_DETAIL="wget exit status $rc"
    case $rc in
        0) TRANSFER=ok ;;
        4|7) TRANSFER=transient ;;           # network failure, protocol error (e.g. a dropped connection)
        8)
            # The server answered with an error; wget --quiet does not say which, so ask once more.
            local line proto code=
            while read -r proto line; do
                case $proto in HTTP/*) code=${line%% *} ;; esac
            done < <(printf '%s\n' "$url" | wget --quiet --server-response --spider --tries=1 \
                        --timeout=60 --input-file=- 2>&1 || true)
            TRANSFER_DETAIL=$code
            if [ -n "$code" ] && is_transient_http "$code"; then TRANSFER=transient; else TRANSFER=refused; fi
            ;;
        3) TRANSFER=fatal; TRANSFER_DETAIL="could not write $dest (is the disk full?)" ;;
        5) TRANSFER=fatal; TRANSFER_DETAIL="the TLS certificate could not be verified (check the system clock and CA certificates)" ;;
        *) TRANSFER=fatal ;;
    esac
}

transfer_curl() {
    local url=$1 dest=$2 rc=0 code quiet=--silent
    if [ -t 1 ]; then quiet=--progress-bar; fi
    # curl reads its config from stdin, so the URL stays off the command line. A 416 answer to a
    # resumed request (the file is already complete) counts as success in curl.
    code=$(printf 'url = "%s"\n' "$url" | curl --config - "$quiet" --fail --location --globoff \
        --continue-at - --output "$dest" --write-out '%{http_code}' \
        --connect-timeout 30 --speed-limit 1 --speed-time 60) || rc=$?
    TRANSFER_DETAIL="curl exit status $rc"
    case $rc in
        0) TRANSFER=ok ;;
        22)
            TRANSFER_DETAIL=$code
            if is_transient_http "$code"; then TRANSFER=transient; else TRANSFER=refused; fi
            ;;
        6|7|18|28|35|52|55|56) TRANSFER=transient ;;   # DNS, connect, cut short, timeout, TLS, send/receive
        23) TRANSFER=fatal; TRANSFER_DETAIL="could not write $dest (is the disk full?)" ;;
        *) TRANSFER=fatal ;;
    esac
}

# An error page where a file was expected: the server said 200 but sent HTML or an XML error.
looks_like_error_page() {
    local head
    head=$(head -c 256 "$1" | tr -d '\000' | tr '[:upper:]' '[:lower:]')
    head=${head#"${head%%[![:space:]]*}"}   # leading whitespace
    case $head in
        '<!doctype html'*|'<html'*|'<?xml'*'<error>'*|'<error>'*) return 0 ;;
        *) return 1 ;;
    esac
}

# Download server path $1 into $2, resuming what $2 already holds and retrying transient errors.
download() {
    local path=$1 dest=$2 label=$3 attempt=1 fresh=yes
    [ -s "$dest" ] && fresh=no
    note "Downloading $label"
    while :; do
        "transfer_$DOWNLOADER" "$(file_url "$path")" "$dest"
        if [ "$TRANSFER" != ok ] && [ ! -s "$dest" ]; then
            rm -f "$dest"   # an empty file the tool created before the error; nothing to resume
        fi
        case $TRANSFER in
            ok) break ;;
            refused) link_refused "$label" "$TRANSFER_DETAIL" ;;
            fatal) die 1 "Downloading $label failed: $TRANSFER_DETAIL." ;;
        esac
        if [ "$attempt" -ge "$RETRIES" ]; then
            die 1 "Downloading $label failed $RETRIES times ($TRANSFER_DETAIL); check the network connection." \
                "Run the script again to continue where it stopped."
        fi
        note "  network error ($TRANSFER_DETAIL); attempt $((attempt + 1)) of $RETRIES in $((RETRY_DELAY * attempt))s, continuing from the bytes already received"
        sleep $((RETRY_DELAY * attempt))
        attempt=$((attempt + 1))
    done
    # Only a download that started from nothing can be judged by its first bytes; an error page
    # appended to a resumed file shows up as a checksum mismatch instead.
    if [ "$fresh" = yes ] && looks_like_error_page "$dest"; then
        rm -f "$dest"
        link_refused "$label" ""
    fi
}

# Small files that no checklist covers (LICENSE, USE_POLICY) and checklist.chk itself go to NAME.part
# first, so that an interrupted or refused download never leaves a half file under the real name.
download_whole() {
    local path=$1 dest=$2 label=$3
    rm -f "$dest.part"
    download "$path" "$dest.part" "$label"
    mv -f "$dest.part" "$dest"
}

# ---------------------------------------------------------------------------------------------------
# checklist.chk, in md5sum's format: "<32 hex digits>  <name>" (or " *<name>" for binary mode).

# Print "<md5> <name>" for each line; refuse anything else, which would mean an error page or a
# name that points outside the model's folder.
read_checklist() {
    local file=$1 line sum name
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        [ -n "$line" ] || continue
        sum=${line%% *}
        name=${line#* }
        name=${name# }
        name=${name#\*}
        name=${name#./}
        case $sum in *[!0-9a-fA-F]*) return 1 ;; esac
        [ "${#sum}" -eq 32 ] || return 1
        case $name in ''|*/*|.|..) return 1 ;; esac
        printf '%s %s\n' "$(lowercase "$sum")" "$name"
    done <"$file"
}

# The expected MD5 of $2 according to checklist $1, or nothing if it is not listed.
expected_md5() {
    local sum name
    while read -r sum name; do
        if [ "$name" = "$2" ]; then printf '%s' "$sum"; return 0; fi
    done < <(read_checklist "$1")
}

# ---------------------------------------------------------------------------------------------------

FAILED=()     # "folder/name: reason" for every file that did not verify

# Download one model (index $1 into the model table) and verify it.
download_model() {
    local i=$1 shard name dest sum expected label
    local local_dir=$TARGET_FOLDER/${MODEL_LOCAL[$i]} remote_dir=${MODEL_REMOTE[$i]}
    local checklist=$local_dir/checklist.chk verified=' '
    local files=()

    note "== ${MODEL_NAMES[$i]} -> $local_dir"
    mkdir -p "$local_dir"

    # Always fetched afresh: it is what says whether the files already on disk are complete.
    download_whole "$remote_dir/checklist.chk" "$checklist" "${MODEL_LOCAL[$i]}/checklist.chk"
    if ! read_checklist "$checklist" >/dev/null || [ ! -s "$checklist" ]; then
        mv -f "$checklist" "$checklist.bad"
        die 1 "${MODEL_LOCAL[$i]}/checklist.chk is not a list of MD5 sums (kept as checklist.chk.bad)." \
            "The server most likely sent an error page: the link has expired or was mistyped." \
            "Request a new link from Meta and run this script again with it."
    fi

    for ((shard = 0; shard < MODEL_SHARDS[i]; shard++)); do
        files+=("$(printf 'consolidated.%02d.pth' "$shard")")
    done
    files+=(params.json tokenizer.model)

    for name in "${files[@]}"; do
        dest=$local_dir/$name
        label=${MODEL_LOCAL[$i]}/$name
        expected=$(expected_md5 "$checklist" "$name")
        if [ -f "$dest" ] && [ -n "$expected" ]; then
            if [ "$(md5_of "$dest")" = "$expected" ]; then
                note "Already downloaded and verified: $label"
                verified="$verified$name "
                continue
            fi
        elif [ -f "$dest" ]; then
            # Not in the checklist, so there is nothing to check it against: keep what is there.
            note "Already downloaded (not in checklist.chk, so not verified): $label"
            continue
        fi
        download "$remote_dir/$name" "$dest" "$label"
        [ -n "$expected" ] || warn "$label is not listed in checklist.chk, so it cannot be verified."
    done

    note "Verifying ${MODEL_LOCAL[$i]} against checklist.chk"
    while read -r sum name; do
        label=${MODEL_LOCAL[$i]}/$name
        dest=$local_dir/$name
        case $verified in *" $name "*) continue ;; esac
        if [ ! -f "$dest" ]; then
            FAILED+=("$label: missing")
        elif [ "$(md5_of "$dest")" = "$sum" ]; then
            note "  OK  $label"
        else
            # Kept for inspection, out of the way of the next run, which downloads the file afresh.
            mv -f "$dest" "$dest.bad"
            FAILED+=("$label: checksum mismatch, kept as $name.bad")
            warn "checksum mismatch: $label (kept as $label.bad)"
        fi
    done < <(read_checklist "$checklist")
}

main() {
    case ${1:-} in
        -h|--help) usage; exit 0 ;;
        '') ;;
        *) usage >&2; die 2 "Unknown argument: $1" ;;
    esac
    [ "$#" -le 1 ] || { usage >&2; die 2 "Too many arguments."; }

    RETRIES=${DOWNLOAD_RETRIES:-5}
    RETRY_DELAY=${DOWNLOAD_RETRY_DELAY:-5}
    case $RETRIES in ''|*[!0-9]*|0) die 2 "DOWNLOAD_RETRIES must be a whole number of at least 1." ;; esac
    case $RETRY_DELAY in ''|*[!0-9]*) die 2 "DOWNLOAD_RETRY_DELAY must be a whole number of seconds." ;; esac

    check_tools

    if [ -z "${PRESIGNED_URL:-}" ]; then
        printf 'Enter the URL from email: ' >&2
        IFS= read -r PRESIGNED_URL || [ -n "$PRESIGNED_URL" ] ||
            die 2 "No URL given. Paste the URL from Meta's email, or set PRESIGNED_URL."
        [ -t 0 ] || printf '\n' >&2   # a terminal echoed the user's Enter already
    fi
    check_url

    # Set but empty means all models, so that MODEL_SIZE= skips the question in scripts.
    local answer
    if [ -n "${MODEL_SIZE+set}" ]; then
        answer=$MODEL_SIZE
    else
        printf 'Enter the list of models to download without spaces (%s), or press Enter for all: ' \
            "$VALID_NAMES" >&2
        IFS= read -r answer || [ -n "$answer" ] ||
            die 2 "No answer to the list of models; set MODEL_SIZE to choose without the question."
        [ -t 0 ] || printf '\n' >&2   # a terminal echoed the user's Enter already
    fi

    # Which models: indices into the model table, each once, in the order given.
    local selected=() item i found
    answer=$(printf '%s' "$answer" | tr -d '[:space:]')
    if [ -z "$answer" ]; then answer=$VALID_NAMES; fi
    local old_ifs=$IFS
    IFS=,
    # shellcheck disable=SC2086  # split on commas on purpose
    set -- $answer
    IFS=$old_ifs
    for item in "$@"; do
        [ -n "$item" ] || continue
        found=
        for i in "${!MODEL_NAMES[@]}"; do
            if [ "$(lowercase "$item")" = "$(lowercase "${MODEL_NAMES[$i]}")" ]; then found=$i; fi
        done
        [ -n "$found" ] || die 2 "Unknown model '$item'. Valid names (case-insensitive): $VALID_NAMES"
        case " ${selected[*]:-} " in *" $found "*) ;; *) selected+=("$found") ;; esac
    done
    [ "${#selected[@]}" -gt 0 ] || die 2 "No model named. Valid names (case-insensitive): $VALID_NAMES"

    TARGET_FOLDER=${TARGET_FOLDER:-.}
    mkdir -p "$TARGET_FOLDER"
    note "Downloading into $TARGET_FOLDER with $DOWNLOADER; verifying with $MD5_TOOL"

    # Nothing to verify these against, so an existing copy is kept as it is.
    for item in LICENSE USE_POLICY; do
        if [ -s "$TARGET_FOLDER/$item" ]; then
            note "Already downloaded: $item"
        else
            download_whole "$item" "$TARGET_FOLDER/$item" "$item"
        fi
    done

    for i in "${selected[@]}"; do
        download_model "$i"
    done

    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf 'ERROR: %s\n' "These files did not verify against their checklist.chk:" >&2
        printf '  %s\n' "${FAILED[@]}" >&2
        printf '%s\n' "The files that verified are kept. Run the script again to download the others afresh;" \
            "delete the .bad files once it succeeds." >&2
        exit 1
    fi
    note "Done: every file verified."
}

main "$@"
