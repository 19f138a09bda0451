/*
 * extlock: interval tree (augmented red-black tree) over half-open extents
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Nodes are embedded in the caller's structures (like the Linux kernel's
 * rbtree): no allocation happens inside the tree. Insert and remove are
 * O(log n); visiting every node overlapping an extent is O(log n + k).
 * Several nodes may have identical extents.
 */
#ifndef EXTLOCK_INTERVAL_TREE_H
#define EXTLOCK_INTERVAL_TREE_H

#include <stddef.h>
#include "extlock/extent.h"

typedef struct ExtlockITNode {
    struct ExtlockITNode *parent, *left, *right;
    bool red;
    ExtlockExtent ext;       /* set by the caller before insert */
    uint64_t subtree_max_end;  /* private */
} ExtlockITNode;

typedef struct ExtlockITree {
    ExtlockITNode *root;
    size_t count;
} ExtlockITree;

#define EXTLOCK_ITREE_INIT { NULL, 0 }

/* Insert @node, whose ext must already be set and valid (start < end). */
void extlock_itree_insert(ExtlockITree *tree, ExtlockITNode *node);
void extlock_itree_remove(ExtlockITree *tree, ExtlockITNode *node);

/*
 * Call @fn for every node overlapping @ext in ascending start order.
 * If @fn returns false the walk stops early. The tree must not be
 * modified from within @fn.
 */
typedef bool (*ExtlockITVisit)(ExtlockITNode *node, void *opaque);
void extlock_itree_foreach_overlap(ExtlockITree *tree, ExtlockExtent ext,
                                   ExtlockITVisit fn, void *opaque);

/* In-order iteration over all nodes */
ExtlockITNode *extlock_itree_first(ExtlockITree *tree);
ExtlockITNode *extlock_itree_next(ExtlockITNode *node);

/*
 * Debug: verify red-black and augmentation invariants; returns false if broken
 */
bool extlock_itree_check(ExtlockITree *tree);

#endif /* EXTLOCK_INTERVAL_TREE_H */
