"""
HellaSwag's validation set (Zellers et al., 2019): 10,042 examples of a context and four endings, one
of them right, as the original release's JSON lines (`ctx`, `endings`, `label`, `activity_label`, ...).
Writes hellaswag_val.jsonl in this folder, for eval_hellaswag.py and train.py --hellaswag_interval.
Uses the file already in this folder if it is there, downloads it otherwise.

    python data/hellaswag/prepare.py
"""

import os
import sys

import requests

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_NAME = "hellaswag_val.jsonl"


def fetch_hellaswag(folder):
    """Path of hellaswag_val.jsonl in folder, downloading it first when it is missing. The download
    goes to a temporary file renamed into place once complete, so a failure leaves no partial file."""
    path = os.path.join(folder, FILE_NAME)
    if os.path.exists(path):
        return path
    tmp_path = f"{path}.tmp"
    try:
        with requests.get(DATA_URL, stream=True, timeout=30) as response:
            response.raise_for_status()
            with open(tmp_path, "wb") as f:
                for block in response.iter_content(chunk_size=1 << 20):
                    f.write(block)
    except requests.RequestException as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        sys.exit(f"error: could not download HellaSwag ({type(e).__name__}); "
                 f"put {FILE_NAME} from {DATA_URL} in {folder} and run this again")
    os.replace(tmp_path, path)
    return path


def main(folder=os.path.dirname(os.path.abspath(__file__))):
    path = fetch_hellaswag(folder)
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    print(f"{path}: {n:,} examples")


if __name__ == "__main__":
    main()
