/*
 * extlock: interval tree (augmented red-black tree) over half-open extents
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Nodes are ordered by (ext.start, node address); the address breaks ties
 * so that identical extents are still totally ordered.  Every node keeps
 * subtree_max_end, the largest ext.end in its subtree, which lets the
 * overlap walk skip subtrees that end before the query starts.
 *
 * The augmentation is kept correct as follows: on insert every node on the
 * path down to the new leaf is widened; on remove the path from the lowest
 * structurally changed node up to the root is recomputed; a rotation only
 * changes the subtrees of the two nodes it swaps, so it recomputes just
 * those two (the subtree of the new top has the same node set as the old
 * top had, so it takes over the old value).
 */
#ifdef EXTLOCK_IN_QEMU
#include "qemu/osdep.h"   /* first, as every QEMU file (block/meson.build) */
#endif
#include <stdint.h>
#include "extlock/interval-tree.h"

static inline uint64_t itree_max3(uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t m = a > b ? a : b;

    return m > c ? m : c;
}

static inline uint64_t itree_sme(const ExtlockITNode *n)
{
    return n ? n->subtree_max_end : 0;
}

static inline bool itree_is_red(const ExtlockITNode *n)
{
    return n && n->red;
}

static inline void itree_recompute(ExtlockITNode *n)
{
    n->subtree_max_end = itree_max3(n->ext.end, itree_sme(n->left),
                                    itree_sme(n->right));
}

/* Total order: start, then node address */
static inline int itree_cmp(const ExtlockITNode *a, const ExtlockITNode *b)
{
    if (a->ext.start != b->ext.start) {
        return a->ext.start < b->ext.start ? -1 : 1;
    }
    if (a == b) {
        return 0;
    }
    return (uintptr_t)a < (uintptr_t)b ? -1 : 1;
}

static inline void itree_replace_child(ExtlockITree *tree,
                                       ExtlockITNode *parent,
                                       ExtlockITNode *old,
                                       ExtlockITNode *new)
{
    if (!parent) {
        tree->root = new;
    } else if (parent->left == old) {
        parent->left = new;
    } else {
        parent->right = new;
    }
}

/*
 *     x              y
 *    / \            / \
 *   a   y    ->    x   c
 *      / \        / \
 *     b   c      a   b
 */
static void itree_rotate_left(ExtlockITree *tree, ExtlockITNode *x)
{
    ExtlockITNode *y = x->right;

    x->right = y->left;
    if (y->left) {
        y->left->parent = x;
    }
    y->parent = x->parent;
    itree_replace_child(tree, x->parent, x, y);
    y->left = x;
    x->parent = y;

    y->subtree_max_end = x->subtree_max_end;
    itree_recompute(x);
}

static void itree_rotate_right(ExtlockITree *tree, ExtlockITNode *x)
{
    ExtlockITNode *y = x->left;

    x->left = y->right;
    if (y->right) {
        y->right->parent = x;
    }
    y->parent = x->parent;
    itree_replace_child(tree, x->parent, x, y);
    y->right = x;
    x->parent = y;

    y->subtree_max_end = x->subtree_max_end;
    itree_recompute(x);
}

static void itree_insert_fixup(ExtlockITree *tree, ExtlockITNode *n)
{
    ExtlockITNode *p, *g, *u;

    while ((p = n->parent) && p->red) {
        /* p is red, so it is not the root and g exists */
        g = p->parent;
        if (p == g->left) {
            u = g->right;
            if (itree_is_red(u)) {
                p->red = false;
                u->red = false;
                g->red = true;
                n = g;
                continue;
            }
            if (n == p->right) {
                itree_rotate_left(tree, p);
                n = p;
                p = n->parent;
            }
            p->red = false;
            g->red = true;
            itree_rotate_right(tree, g);
        } else {
            u = g->left;
            if (itree_is_red(u)) {
                p->red = false;
                u->red = false;
                g->red = true;
                n = g;
                continue;
            }
            if (n == p->left) {
                itree_rotate_right(tree, p);
                n = p;
                p = n->parent;
            }
            p->red = false;
            g->red = true;
            itree_rotate_left(tree, g);
        }
        break;
    }
    tree->root->red = false;
}

void extlock_itree_insert(ExtlockITree *tree, ExtlockITNode *node)
{
    ExtlockITNode **link = &tree->root;
    ExtlockITNode *parent = NULL;

    node->left = NULL;
    node->right = NULL;
    node->red = true;
    node->subtree_max_end = node->ext.end;

    while (*link) {
        parent = *link;
        if (parent->subtree_max_end < node->ext.end) {
            parent->subtree_max_end = node->ext.end;
        }
        link = itree_cmp(node, parent) < 0 ? &parent->left : &parent->right;
    }
    node->parent = parent;
    *link = node;
    tree->count++;

    itree_insert_fixup(tree, node);
}

/*
 * Restore the red-black properties after a black node was removed; @x
 * (possibly NULL) is the node that took its place and carries an extra
 * black, @parent is x's parent.
 */
static void itree_remove_fixup(ExtlockITree *tree, ExtlockITNode *x,
                               ExtlockITNode *parent)
{
    ExtlockITNode *w;

    while (x != tree->root && !itree_is_red(x)) {
        if (x == parent->left) {
            w = parent->right;
            if (w->red) {
                w->red = false;
                parent->red = true;
                itree_rotate_left(tree, parent);
                w = parent->right;
            }
            if (!itree_is_red(w->left) && !itree_is_red(w->right)) {
                w->red = true;
                x = parent;
                parent = x->parent;
                continue;
            }
            if (!itree_is_red(w->right)) {
                w->left->red = false;
                w->red = true;
                itree_rotate_right(tree, w);
                w = parent->right;
            }
            w->red = parent->red;
            parent->red = false;
            w->right->red = false;
            itree_rotate_left(tree, parent);
        } else {
            w = parent->left;
            if (w->red) {
                w->red = false;
                parent->red = true;
                itree_rotate_right(tree, parent);
                w = parent->left;
            }
            if (!itree_is_red(w->left) && !itree_is_red(w->right)) {
                w->red = true;
                x = parent;
                parent = x->parent;
                continue;
            }
            if (!itree_is_red(w->left)) {
                w->right->red = false;
                w->red = true;
                itree_rotate_left(tree, w);
                w = parent->left;
            }
            w->red = parent->red;
            parent->red = false;
            w->left->red = false;
            itree_rotate_right(tree, parent);
        }
        x = tree->root;
        break;
    }
    if (x) {
        x->red = false;
    }
}

void extlock_itree_remove(ExtlockITree *tree, ExtlockITNode *node)
{
    ExtlockITNode *child, *parent, *y, *n;
    bool removed_red;

    if (!node->left || !node->right) {
        /* At most one child: splice the node out directly */
        child = node->left ? node->left : node->right;
        parent = node->parent;
        removed_red = node->red;
        if (child) {
            child->parent = parent;
        }
        itree_replace_child(tree, parent, node, child);
    } else {
        /* Two children: the in-order successor y takes node's place */
        y = node->right;
        while (y->left) {
            y = y->left;
        }
        removed_red = y->red;
        child = y->right;
        if (y->parent == node) {
            parent = y;
        } else {
            parent = y->parent;
            parent->left = child;
            if (child) {
                child->parent = parent;
            }
            y->right = node->right;
            node->right->parent = y;
        }
        y->left = node->left;
        node->left->parent = y;
        y->parent = node->parent;
        itree_replace_child(tree, node->parent, node, y);
        y->red = node->red;
    }

    /*
     * Every node whose subtree lost a member lies on the path from
     * @parent to the root (if y moved up, it is on that path too).
     */
    for (n = parent; n; n = n->parent) {
        itree_recompute(n);
    }
    tree->count--;

    if (!removed_red) {
        itree_remove_fixup(tree, child, parent);
    }

    node->parent = NULL;
    node->left = NULL;
    node->right = NULL;
}

/*
 * In-order walk restricted to nodes that can overlap @q.  Returns false
 * when @fn asked to stop.
 */
static bool itree_walk(ExtlockITNode *n, ExtlockExtent q,
                       ExtlockITVisit fn, void *opaque)
{
    while (n) {
        if (n->subtree_max_end <= q.start) {
            /* Everything below ends before the query starts */
            return true;
        }
        if (n->left && !itree_walk(n->left, q, fn, opaque)) {
            return false;
        }
        if (n->ext.start >= q.end) {
            /* n and its right subtree all start after the query */
            return true;
        }
        if (n->ext.end > q.start && !fn(n, opaque)) {
            return false;
        }
        n = n->right;
    }
    return true;
}

void extlock_itree_foreach_overlap(ExtlockITree *tree, ExtlockExtent ext,
                                   ExtlockITVisit fn, void *opaque)
{
    if (ext.start >= ext.end) {
        return;
    }
    itree_walk(tree->root, ext, fn, opaque);
}

ExtlockITNode *extlock_itree_first(ExtlockITree *tree)
{
    ExtlockITNode *n = tree->root;

    if (!n) {
        return NULL;
    }
    while (n->left) {
        n = n->left;
    }
    return n;
}

ExtlockITNode *extlock_itree_next(ExtlockITNode *node)
{
    ExtlockITNode *p;

    if (node->right) {
        node = node->right;
        while (node->left) {
            node = node->left;
        }
        return node;
    }
    p = node->parent;
    while (p && node == p->right) {
        node = p;
        p = p->parent;
    }
    return p;
}

typedef struct ItreeCheckState {
    const ExtlockITNode *prev;  /* previous node in order */
    size_t count;
} ItreeCheckState;

/* Returns the black height of @n's subtree, or -1 if it is broken */
static int itree_check_node(const ExtlockITNode *n,
                            const ExtlockITNode *parent,
                            ItreeCheckState *s)
{
    int lh, rh;

    if (!n) {
        return 1;
    }
    if (n->parent != parent) {
        return -1;
    }
    if (n->ext.start >= n->ext.end) {
        return -1;
    }
    if (n->red && itree_is_red(parent)) {
        return -1;
    }
    lh = itree_check_node(n->left, n, s);
    if (lh < 0) {
        return -1;
    }
    if (s->prev && itree_cmp(s->prev, n) >= 0) {
        return -1;
    }
    s->prev = n;
    s->count++;
    rh = itree_check_node(n->right, n, s);
    if (rh < 0 || lh != rh) {
        return -1;
    }
    if (n->subtree_max_end != itree_max3(n->ext.end, itree_sme(n->left),
                                         itree_sme(n->right))) {
        return -1;
    }
    return lh + (n->red ? 0 : 1);
}

bool extlock_itree_check(ExtlockITree *tree)
{
    ItreeCheckState s = { NULL, 0 };

    if (tree->root && (tree->root->red || tree->root->parent)) {
        return false;
    }
    if (itree_check_node(tree->root, NULL, &s) < 0) {
        return false;
    }
    return s.count == tree->count;
}
