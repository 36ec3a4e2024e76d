"""Dataset sources: one module per input layout, each listing the records of a split.

    records.py        Record and its bytes (file, archive member, pixels), Listing, Source, SourceOptions
    layouts.py        the layout table (name, implementation, what it expects), detection, open_source
    scan.py           helpers the layouts share: image files, record keys and order, empty-split errors
    imagenet.py       ILSVRC2012: extracted tree (standard or Kaggle), original archives read in place,
                      val labels (class folders, LOC_val_solution.csv, devkit, --val-labels)
    tiny_imagenet.py  Tiny-ImageNet-200 (wnids.txt, words.txt, val_annotations.txt; unlabeled test)
    cifar.py          CIFAR-10 python batches (pixels, stored as lossless PNG)
    folder.py         any class-per-folder tree (torchvision's ImageFolder convention)
    synth.py          a generated, learnable dataset in the Tiny-ImageNet layout (`shardtool synth`)

A layout only lists: names, labels and where the bytes are. It never decodes images; build workers do
that (shardtool/images.py). Listings are sorted by the record's canonical source name, so the order a
filesystem returns files in never changes a build.
"""

from .layouts import LAYOUTS, Layout, detect, open_source
from .records import FileData, Listing, MemberData, PixelData, Record, Source, SourceOptions, Stamp

__all__ = [
    "LAYOUTS",
    "FileData",
    "Layout",
    "Listing",
    "MemberData",
    "PixelData",
    "Record",
    "Source",
    "SourceOptions",
    "Stamp",
    "detect",
    "open_source",
]
