/*
 * extlock-virt: put an extlock node under a disk of a libvirt domain XML
 *
 * Copyright (c) 2026 The extlock authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 *
 * Reads a domain XML (virsh dumpxml --inactive), finds the disk with the
 * given target (vdb) and writes the XML with
 *
 *   - <qemu:commandline>: a -blockdev for the extlock node, on top of the
 *     format node libvirt makes for the disk (libvirt-N-format), and with
 *     TLS a -object tls-creds-x509/-psk for it;
 *   - <qemu:override>: the disk's device takes the extlock node as its
 *     'drive' instead of libvirt's node;
 *   - a user alias (ua-extlock-vdb) on the disk, which the override names.
 *
 * libvirt still opens the image itself (NFS, cache mode, <shareable/>:
 * share-rw=on and no image locking of its own); extlock only sits between
 * the device and the image.  The name of libvirt's node is not written in
 * the XML: libvirt 9.0 numbers the storage sources of the domain's disks
 * at start, from the last disk (in its sorted order) to the first, the top
 * of each disk's chain first.  So the number is known from the XML when
 * every disk after the shared one has a known chain (raw, or an explicit
 * <backingStore>); otherwise extlock-virt refuses, and --node names the
 * node.  docs/libvirt.rst has the recipe and the reasons.
 *
 * Exit status: 0 written, 1 the XML or the disk cannot be converted (the
 * message says why), 2 bad usage.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <glib.h>
#include <json-c/json.h>
#include <libxml/parser.h>
#include <libxml/tree.h>

#define QEMU_NS "http://libvirt.org/schemas/domain/qemu/1.0"
#define NODE_PREFIX "xl-"
#define ALIAS_PREFIX "ua-extlock-"
#define TLS_PREFIX "xl-tls-"
/* QEMU's limit for node names and ids (32-byte buffer) */
#define QEMU_NAME_MAX 31
/*
 * The extlock driver's option for a list of coordinators (issue 11: the
 * replicas of an HA coordinator, BlockdevOptionsExtlock's 'coordinators',
 * exclusive with 'coordinator').  Set it to NULL for a driver that takes
 * one address only: then more than one address is refused.
 */
#define COORDINATOR_LIST_KEY "coordinators"

typedef struct Options {
    char *disk;
    char *lock_space;
    char **coordinators;
    char *client_id;
    char *tls_creds_dir;
    char *tls_psk_user;
    char *tls_hostname;
    gint64 lease_time;
    char *on_lease_loss;
    gint64 lease_loss_timeout;
    char **extra;               /* KEY=VALUE */
    char *node;
    gboolean preallocated;
    char *output;
    char *libvirt_version;      /* "MAJOR.MINOR[.MICRO]" */
    /* that libvirt opens raw disks without a format node */
    gboolean no_raw_layer;
} Options;

static const char *prog = "extlock-virt";

/*
 * the options and the document live until exit (also on the error paths,
 * which exit from where they are)
 */
static Options opts;
static xmlDoc *doc;

static void G_GNUC_PRINTF(1, 2) fail(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/*
 * XML helpers
 */
static gboolean is_elem(xmlNode *n, const char *name)
{
    return n->type == XML_ELEMENT_NODE && !n->ns &&
           strcmp((const char *)n->name, name) == 0;
}

static gboolean is_qemu_elem(xmlNode *n, const char *name)
{
    return n->type == XML_ELEMENT_NODE && n->ns && n->ns->href &&
           strcmp((const char *)n->ns->href, QEMU_NS) == 0 &&
           strcmp((const char *)n->name, name) == 0;
}

static xmlNode *child(xmlNode *parent, const char *name)
{
    for (xmlNode *c = parent->children; c; c = c->next) {
        if (is_elem(c, name)) {
            return c;
        }
    }
    return NULL;
}

static xmlNode *qemu_child(xmlNode *parent, const char *name)
{
    for (xmlNode *c = parent->children; c; c = c->next) {
        if (is_qemu_elem(c, name)) {
            return c;
        }
    }
    return NULL;
}

/* An attribute as a g_malloc'ed string, or NULL */
static char *attr(xmlNode *n, const char *name)
{
    xmlChar *v;
    char *s;

    if (!n) {
        return NULL;
    }
    v = xmlGetProp(n, (const xmlChar *)name);
    if (!v) {
        return NULL;
    }
    s = g_strdup((const char *)v);
    xmlFree(v);
    return s;
}

/*
 * libvirt's order of disks and its node numbering
 */
typedef struct Disk {
    xmlNode *node;
    char *dev;                  /* target dev */
    char *bus;
    int chain;                  /* storage sources; -1: unknown from XML */
} Disk;

static void disk_free(gpointer p)
{
    Disk *d = p;

    g_free(d->dev);
    g_free(d->bus);
    g_free(d);
}

/* libvirt's virDiskNameToIndex: vda -> 0, vdz -> 25, vdaa -> 26 */
static int disk_name_index(const char *dev)
{
    static const char *const prefixes[] = {
        "fd", "hd", "vd", "sd", "xvd", "ubd"
    };
    const char *p = NULL;
    int idx = 0;

    for (size_t i = 0; i < G_N_ELEMENTS(prefixes); i++) {
        if (g_str_has_prefix(dev, prefixes[i])) {
            p = dev + strlen(prefixes[i]);
            break;
        }
    }
    if (!p || !*p) {
        return -1;
    }
    for (int i = 0; *p >= 'a' && *p <= 'z'; i++, p++) {
        idx = (idx + (i < 1 ? 0 : 1)) * 26 + (*p - 'a');
    }
    return idx;
}

static char *default_bus(const char *dev)
{
    if (g_str_has_prefix(dev, "hd")) {
        return g_strdup("ide");
    } else if (g_str_has_prefix(dev, "sd")) {
        return g_strdup("scsi");
    } else if (g_str_has_prefix(dev, "vd")) {
        return g_strdup("virtio");
    } else if (g_str_has_prefix(dev, "fd")) {
        return g_strdup("fdc");
    }
    return g_strdup("");
}

static gboolean has_source(xmlNode *n)
{
    xmlNode *src = child(n, "source");

    if (!src) {
        return FALSE;
    }
    /* an empty <source/> of a cdrom is no source */
    return src->properties != NULL || src->children != NULL;
}

/*
 * How many storage sources libvirt opens for this disk: the disk itself
 * and the levels of its backing chain.  A disk without media counts one
 * (libvirt gives it a number too).  -1 if libvirt would probe the chain at
 * start (a format other than raw without an explicit <backingStore>).
 */
static int disk_chain(xmlNode *n)
{
    int count = 1;
    xmlNode *level = n;

    if (!has_source(n)) {
        return 1;
    }
    for (;;) {
        xmlNode *bs = child(level, "backingStore");
        g_autofree char *fmt = NULL;

        if (!bs) {
            xmlNode *drv = child(level, level == n ? "driver" : "format");

            fmt = attr(drv, "type");
            return fmt && strcmp(fmt, "raw") == 0 ? count : -1;
        }
        if (!has_source(bs)) {
            return count;           /* <backingStore/>: no backing */
        }
        count++;
        level = bs;
    }
}

/*
 * The disks in libvirt's order (virDomainDiskInsert: a disk goes before
 * the first disk of its bus with a higher target index, or after the last
 * one of its bus; a disk of a new bus goes last)
 */
static GPtrArray *disks_in_libvirt_order(xmlNode *devices)
{
    GPtrArray *disks = g_ptr_array_new_with_free_func(disk_free);

    for (xmlNode *c = devices->children; c; c = c->next) {
        xmlNode *target;
        Disk *d;
        int insert_at = -1;
        int idx;

        if (!is_elem(c, "disk")) {
            continue;
        }
        target = child(c, "target");
        d = g_new0(Disk, 1);
        d->node = c;
        d->dev = attr(target, "dev");
        if (!d->dev) {
            d->dev = g_strdup("");
        }
        d->bus = attr(target, "bus");
        if (!d->bus) {
            d->bus = default_bus(d->dev);
        }
        d->chain = disk_chain(c);
        idx = disk_name_index(d->dev);
        for (int i = (int)disks->len - 1; i >= 0; i--) {
            Disk *o = g_ptr_array_index(disks, i);

            if (strcmp(o->bus, d->bus) != 0) {
                continue;
            }
            if (disk_name_index(o->dev) > idx) {
                insert_at = i;
            } else if (insert_at == -1) {
                insert_at = i + 1;
            }
        }
        if (insert_at == -1) {
            g_ptr_array_add(disks, d);
        } else {
            g_ptr_array_insert(disks, insert_at, d);
        }
    }
    return disks;
}

/*
 * Options
 */
static json_object *typed_value(const char *text)
{
    char *end;
    long long v;

    if (!strcmp(text, "on") || !strcmp(text, "true")) {
        return json_object_new_boolean(1);
    }
    if (!strcmp(text, "off") || !strcmp(text, "false")) {
        return json_object_new_boolean(0);
    }
    errno = 0;
    v = strtoll(text, &end, 10);
    if (*text && !*end && !errno) {
        return json_object_new_int64(v);
    }
    return json_object_new_string(text);
}

/* unix:PATH or tcp:HOST:PORT (tcp:[V6]:PORT), as extlockd --listen */
static json_object *coordinator_json(const char *addr)
{
    json_object *o = json_object_new_object();

    if (g_str_has_prefix(addr, "unix:") && addr[5]) {
        json_object_object_add(o, "type", json_object_new_string("unix"));
        json_object_object_add(o, "path", json_object_new_string(addr + 5));
        return o;
    }
    if (g_str_has_prefix(addr, "tcp:")) {
        const char *hp = addr + 4;
        const char *colon = strrchr(hp, ':');
        g_autofree char *host = NULL;

        if (colon && colon > hp && colon[1]) {
            host = g_strndup(hp, colon - hp);
            if (host[0] == '[' && host[strlen(host) - 1] == ']') {
                char *inner = g_strndup(host + 1, strlen(host) - 2);

                g_free(host);
                host = inner;
            }
            for (const char *p = colon + 1; *p; p++) {
                if (!g_ascii_isdigit(*p)) {
                    g_clear_pointer(&host, g_free);
                    break;
                }
            }
        }
        if (host && *host) {
            json_object_object_add(o, "type", json_object_new_string("inet"));
            json_object_object_add(o, "host", json_object_new_string(host));
            json_object_object_add(o, "port",
                                   json_object_new_string(colon + 1));
            return o;
        }
    }
    json_object_put(o);
    return NULL;
}

static void usage_error(GOptionContext *ctx, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", prog);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry '%s --help'.\n", prog);
    g_option_context_free(ctx);
    exit(2);
}

static gboolean valid_name(const char *s)
{
    if (!s || !*s) {
        return FALSE;
    }
    for (const char *p = s; *p; p++) {
        if (!g_ascii_isalnum(*p) && *p != '-' && *p != '_' && *p != '.') {
            return FALSE;
        }
    }
    return TRUE;
}

/*
 * The conversion
 */
static xmlNode *disk_by_target(xmlNode *devices, const char *target,
                               GString *seen)
{
    xmlNode *found = NULL;

    for (xmlNode *c = devices->children; c; c = c->next) {
        g_autofree char *dev = NULL;

        if (!is_elem(c, "disk")) {
            continue;
        }
        dev = attr(child(c, "target"), "dev");
        if (dev && strcmp(dev, target) == 0) {
            found = c;
        }
        g_string_append_printf(seen, "%s%s", seen->len ? ", " : "",
                               dev ? dev : "(no target)");
    }
    return found;
}

static void check_disk(xmlNode *disk, const Options *o)
{
    const char *t = o->disk;
    g_autofree char *device = attr(disk, "device");
    g_autofree char *type = attr(disk, "type");
    g_autofree char *fmt = attr(child(disk, "driver"), "type");
    g_autofree char *alias = attr(child(disk, "alias"), "name");
    xmlNode *src = child(disk, "source");

    if (device && strcmp(device, "disk") != 0) {
        fail("disk %s is a %s: only device='disk' can be shared through "
             "extlock", t, device);
    }
    if (!src || !has_source(disk)) {
        fail("disk %s has no <source>", t);
    }
    if (type && strcmp(type, "file") != 0 && strcmp(type, "block") != 0 &&
        strcmp(type, "network") != 0) {
        fail("disk %s is of type '%s': extlock-virt handles file, block and "
             "network (nfs) disks", t, type);
    }
    if (type && strcmp(type, "network") == 0) {
        g_autofree char *proto = attr(src, "protocol");

        if (!proto || strcmp(proto, "nfs") != 0) {
            fail("disk %s is a network disk with protocol '%s': extlock-virt "
                 "handles nfs (or a file or block source)", t,
                 proto ? proto : "(none)");
        }
    }
    if (!fmt) {
        fail("disk %s has no <driver type='...'/>: say type='raw' (libvirt "
             "must not probe the format of a shared image)", t);
    }
    if (strcmp(fmt, "raw") != 0 && !o->preallocated) {
        fail("disk %s has format '%s', not raw: a %s image that grows "
             "allocates clusters and writes metadata that no extent lock "
             "covers, so it must be preallocated (qemu-img create -f %s "
             "-o preallocation=full ...); pass --preallocated if it is", t,
             fmt, fmt, fmt);
    }
    if (child(disk, "backingStore") &&
        has_source(child(disk, "backingStore"))) {
        fail("disk %s has a backing file: a shared extlock disk must be a "
             "single image", t);
    }
    if (!child(disk, "shareable")) {
        fail("disk %s is not <shareable/>: add <shareable/> to the disk so "
             "that libvirt opens it with share-rw=on and leaves its locking "
             "to extlock", t);
    }
    if (child(disk, "readonly")) {
        fail("disk %s is <readonly/>: extlock is for disks written by "
             "several domains", t);
    }
    if (alias && g_str_has_prefix(alias, ALIAS_PREFIX)) {
        fail("disk %s already has an extlock node (alias '%s'): the XML was "
             "converted before", t, alias);
    }
    if (alias && !g_str_has_prefix(alias, "ua-")) {
        fail("disk %s has the alias '%s' of a running domain: convert the "
             "inactive XML (virsh dumpxml --inactive)", t, alias);
    }
}

/*
 * The libvirt node name the extlock node goes on, or NULL with *why set.
 * It is the node libvirt attaches the disk's device to: libvirt-N-format, or,
 * from libvirt 9.10 on (its "effective node" rework; measured: 9.0 makes
 * the format node, 11.3 does not), libvirt-N-storage for a raw disk, which
 * then gets no raw format node.
 */
static char *libvirt_node_name(xmlNode *devices, xmlNode *disk,
                               const Options *o, char **why)
{
    g_autoptr(GPtrArray) disks = disks_in_libvirt_order(devices);
    xmlNode *drv = child(disk, "driver");
    g_autofree char *fmt = drv ? attr(drv, "type") : NULL;
    int index = 1;
    guint pos = 0;

    while (pos < disks->len &&
           ((Disk *)g_ptr_array_index(disks, pos))->node != disk) {
        pos++;
    }
    for (guint i = pos + 1; i < disks->len; i++) {
        Disk *d = g_ptr_array_index(disks, i);

        if (d->chain < 0) {
            *why = g_strdup_printf(
                "cannot tell libvirt's node name for the disk: disk %s after "
                "it is not raw and has no <backingStore>, so libvirt probes "
                "its backing chain at start; add <backingStore/> to disk %s "
                "if it has no backing file, or pass --node", d->dev, d->dev);
            return NULL;
        }
        index += d->chain;
    }
    return g_strdup_printf("libvirt-%d-%s", index,
                           o->no_raw_layer && fmt && !strcmp(fmt, "raw") &&
                           !child(disk, "encryption") ?
                           "storage" : "format");
}

static xmlNode *new_qemu_elem(xmlNode *parent, xmlNs *ns, const char *name)
{
    return xmlNewChild(parent, ns, (const xmlChar *)name, NULL);
}

static void add_arg(xmlNode *cmdline, xmlNs *ns, const char *value)
{
    xmlNode *a = new_qemu_elem(cmdline, ns, "arg");

    xmlNewProp(a, (const xmlChar *)"value", (const xmlChar *)value);
}

static void check_not_converted(xmlNode *root, const char *node_name,
                                const char *alias, const char *target)
{
    for (xmlNode *c = root->children; c; c = c->next) {
        if (is_qemu_elem(c, "commandline")) {
            for (xmlNode *a = c->children; a; a = a->next) {
                g_autofree char *v = attr(a, "value");
                g_autofree char *needle = g_strdup_printf("\"%s\"", node_name);

                if (v && strstr(v, "\"extlock\"") && strstr(v, needle)) {
                    fail("disk %s already has an extlock node (%s in "
                         "<qemu:commandline>): the XML was converted before",
                         target, node_name);
                }
            }
        }
        if (is_qemu_elem(c, "override")) {
            for (xmlNode *d = c->children; d; d = d->next) {
                g_autofree char *a = attr(d, "alias");

                if (is_qemu_elem(d, "device") && a && !strcmp(a, alias)) {
                    fail("disk %s already has a <qemu:override> for '%s': "
                         "the XML was converted before", target, alias);
                }
            }
        }
    }
}

static json_object *blockdev_json(const Options *o, const char *node_name,
                                  const char *file, const char *tls_id)
{
    json_object *bd = json_object_new_object();

    json_object_object_add(bd, "driver", json_object_new_string("extlock"));
    json_object_object_add(bd, "node-name", json_object_new_string(node_name));
    json_object_object_add(bd, "file", json_object_new_string(file));
    json_object_object_add(bd, "lock-space",
                           json_object_new_string(o->lock_space));
    if (g_strv_length(o->coordinators) > 1) {
        /* only reached with COORDINATOR_LIST_KEY set (check_options) */
        json_object *list = json_object_new_array();

        for (char **c = o->coordinators; *c; c++) {
            json_object_array_add(list, coordinator_json(*c));
        }
        json_object_object_add(bd, COORDINATOR_LIST_KEY, list);
    } else {
        json_object_object_add(bd, "coordinator",
                               coordinator_json(o->coordinators[0]));
    }
    if (o->client_id) {
        json_object_object_add(bd, "client-id",
                               json_object_new_string(o->client_id));
    }
    if (tls_id) {
        json_object_object_add(bd, "tls-creds", json_object_new_string(tls_id));
    }
    if (o->tls_hostname) {
        json_object_object_add(bd, "tls-hostname",
                               json_object_new_string(o->tls_hostname));
    }
    if (o->lease_time) {
        json_object_object_add(bd, "lease-time",
                               json_object_new_int64(o->lease_time));
    }
    if (o->on_lease_loss) {
        json_object_object_add(bd, "on-lease-loss",
                               json_object_new_string(o->on_lease_loss));
    }
    if (o->lease_loss_timeout) {
        json_object_object_add(bd, "lease-loss-timeout",
                               json_object_new_int64(o->lease_loss_timeout));
    }
    for (char **kv = o->extra; kv && *kv; kv++) {
        const char *eq = strchr(*kv, '=');
        g_autofree char *key = g_strndup(*kv, eq - *kv);

        json_object_object_add(bd, key, typed_value(eq + 1));
    }
    return bd;
}

static void convert(xmlDoc *doc, const char *input, const Options *o)
{
    xmlNode *root = xmlDocGetRootElement(doc);
    xmlNode *devices, *disk, *alias, *cmdline, *override, *dev, *front, *prop;
    g_autoptr(GString) seen = g_string_new(NULL);
    g_autofree char *domtype = NULL;
    g_autofree char *file = NULL;
    g_autofree char *why = NULL;
    g_autofree char *node_name = g_strconcat(NODE_PREFIX, o->disk, NULL);
    g_autofree char *alias_name = g_strconcat(ALIAS_PREFIX, o->disk, NULL);
    g_autofree char *tls_id = NULL;
    xmlNs *ns;

    if (!root || !is_elem(root, "domain")) {
        fail("%s: not a libvirt domain XML (the root element is <%s>, not "
             "<domain>)", input, root ? (const char *)root->name : "nothing");
    }
    domtype = attr(root, "type");
    if (!domtype ||
        (strcmp(domtype, "qemu") != 0 && strcmp(domtype, "kvm") != 0)) {
        fail("%s: domain type '%s': extlock needs a QEMU domain (type='kvm' "
             "or 'qemu')", input, domtype ? domtype : "(none)");
    }
    devices = child(root, "devices");
    if (!devices) {
        fail("%s: the domain has no <devices>", input);
    }
    disk = disk_by_target(devices, o->disk, seen);
    if (!disk) {
        fail("%s: no disk with target '%s' (the domain's disks: %s)", input,
             o->disk, seen->len ? seen->str : "none");
    }
    check_disk(disk, o);
    if (child(disk, "alias")) {
        g_free(alias_name);
        alias_name = attr(child(disk, "alias"), "name");
    }
    check_not_converted(root, node_name, alias_name, o->disk);
    if (o->node) {
        file = g_strdup(o->node);
    } else {
        file = libvirt_node_name(devices, disk, o, &why);
        if (!file) {
            fail("%s: %s", input, why);
        }
    }

    /* the disk's user alias, for <qemu:override> */
    alias = child(disk, "alias");
    if (!alias) {
        alias = xmlNewChild(disk, NULL, (const xmlChar *)"alias", NULL);
        xmlNewProp(alias, (const xmlChar *)"name", (const xmlChar *)alias_name);
    }

    ns = xmlSearchNsByHref(doc, root, (const xmlChar *)QEMU_NS);
    if (!ns) {
        ns = xmlNewNs(root, (const xmlChar *)QEMU_NS, (const xmlChar *)"qemu");
    }
    cmdline = qemu_child(root, "commandline");
    if (!cmdline) {
        cmdline = new_qemu_elem(root, ns, "commandline");
    }
    if (o->tls_creds_dir) {
        json_object *obj = json_object_new_object();

        tls_id = g_strconcat(TLS_PREFIX, o->disk, NULL);
        json_object_object_add(obj, "qom-type", json_object_new_string(
                                   o->tls_psk_user ? "tls-creds-psk" :
                                   "tls-creds-x509"));
        json_object_object_add(obj, "id", json_object_new_string(tls_id));
        json_object_object_add(obj, "dir",
                               json_object_new_string(o->tls_creds_dir));
        json_object_object_add(obj, "endpoint",
                               json_object_new_string("client"));
        if (o->tls_psk_user) {
            json_object_object_add(obj, "username",
                                   json_object_new_string(o->tls_psk_user));
        }
        add_arg(cmdline, ns, "-object");
        add_arg(cmdline, ns, json_object_to_json_string_ext(
                    obj,
                    JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
        json_object_put(obj);
    }
    {
        json_object *bd = blockdev_json(o, node_name, file, tls_id);

        add_arg(cmdline, ns, "-blockdev");
        add_arg(cmdline, ns, json_object_to_json_string_ext(
                    bd,
                    JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
        json_object_put(bd);
    }

    override = qemu_child(root, "override");
    if (!override) {
        override = new_qemu_elem(root, ns, "override");
    }
    dev = new_qemu_elem(override, ns, "device");
    xmlNewProp(dev, (const xmlChar *)"alias", (const xmlChar *)alias_name);
    front = new_qemu_elem(dev, ns, "frontend");
    prop = new_qemu_elem(front, ns, "property");
    xmlNewProp(prop, (const xmlChar *)"name", (const xmlChar *)"drive");
    xmlNewProp(prop, (const xmlChar *)"type", (const xmlChar *)"string");
    xmlNewProp(prop, (const xmlChar *)"value", (const xmlChar *)node_name);
}

/*
 * --coordinator a,b,c and --coordinator a -c b -c c are the same list:
 * split every value at the commas (an address has none).
 */
static void flatten_coordinators(GOptionContext *ctx, Options *o)
{
    g_autoptr(GPtrArray) all = g_ptr_array_new();

    for (char **c = o->coordinators; *c; c++) {
        char **parts = g_strsplit(*c, ",", -1);

        if (!parts[0]) {
            usage_error(ctx, "--coordinator '': an empty address");
        }
        for (char **p = parts; *p; p++) {
            if (!**p) {
                usage_error(ctx, "--coordinator '%s': an empty address in "
                            "the list", *c);
            }
            g_ptr_array_add(all, *p);
        }
        g_free(parts);          /* the strings moved to all */
    }
    g_ptr_array_add(all, NULL);
    g_strfreev(o->coordinators);
    o->coordinators = (char **)g_ptr_array_steal(all, NULL);
}

static void check_options(GOptionContext *ctx, Options *o, int argc)
{
    if (argc > 2) {
        usage_error(ctx, "one input file at most");
    }
    if (!o->disk) {
        usage_error(ctx, "--disk is required (the target, e.g. vdb)");
    }
    if (!valid_name(o->disk) ||
        strlen(ALIAS_PREFIX) + strlen(o->disk) > QEMU_NAME_MAX) {
        usage_error(ctx, "--disk '%s': not a disk target name", o->disk);
    }
    if (!o->lock_space || !*o->lock_space) {
        usage_error(ctx, "--lock-space is required (the cluster-wide name "
                    "of the shared image)");
    }
    if (strlen(o->lock_space) > 256) {
        usage_error(ctx, "--lock-space: at most 256 bytes");
    }
    if (!o->coordinators || !o->coordinators[0]) {
        usage_error(ctx, "--coordinator is required (unix:PATH or "
                    "tcp:HOST:PORT)");
    }
    flatten_coordinators(ctx, o);
    for (char **c = o->coordinators; *c; c++) {
        json_object *j = coordinator_json(*c);

        if (!j) {
            usage_error(ctx, "--coordinator '%s': expected unix:PATH or "
                        "tcp:HOST:PORT", *c);
        }
        json_object_put(j);
        for (char **d = o->coordinators; d < c; d++) {
            if (!strcmp(*c, *d)) {
                usage_error(ctx, "--coordinator '%s' given twice", *c);
            }
        }
    }
    if (g_strv_length(o->coordinators) > 1 && COORDINATOR_LIST_KEY == NULL) {
        usage_error(ctx, "--coordinator: %u addresses given, but this "
                    "extlock driver takes one coordinator address (the "
                    "list form comes with issue 11)",
                    g_strv_length(o->coordinators));
    }
    if (o->tls_hostname && !o->tls_creds_dir) {
        usage_error(ctx, "--tls-hostname needs --tls-creds-dir");
    }
    if (o->tls_psk_user && !o->tls_creds_dir) {
        usage_error(ctx, "--tls-psk-user needs --tls-creds-dir");
    }
    if (o->lease_time && (o->lease_time < 100 || o->lease_time > 3600000)) {
        usage_error(ctx, "--lease-time must be between 100 and 3600000 ms");
    }
    if (o->lease_loss_timeout < 0) {
        usage_error(ctx, "--lease-loss-timeout must not be negative");
    }
    if (o->on_lease_loss && strcmp(o->on_lease_loss, "queue") != 0 &&
        strcmp(o->on_lease_loss, "error") != 0) {
        usage_error(ctx, "--on-lease-loss must be 'queue' or 'error'");
    }
    for (char **kv = o->extra; kv && *kv; kv++) {
        const char *eq = strchr(*kv, '=');

        if (!eq || eq == *kv) {
            usage_error(ctx, "--option '%s': expected KEY=VALUE", *kv);
        }
    }
    if (o->node && (!valid_name(o->node) || strlen(o->node) > QEMU_NAME_MAX)) {
        usage_error(ctx, "--node '%s': not a node name", o->node);
    }
    if (o->libvirt_version) {
        unsigned major, minor, micro = 0;
        char end;
        int n = sscanf(o->libvirt_version, "%u.%u.%u%c", &major, &minor,
                       &micro, &end);

        if ((n != 2 && n != 3) ||
            strspn(o->libvirt_version, "0123456789.") !=
            strlen(o->libvirt_version)) {
            usage_error(ctx, "--libvirt-version '%s': expected "
                        "MAJOR.MINOR[.MICRO] (virsh version)",
                        o->libvirt_version);
        }
        o->no_raw_layer = major > 9 || (major == 9 && minor >= 10);
    }
}

#define o opts

int main(int argc, char **argv)
{
    GOptionEntry entries[] = {
        { "disk", 'd', 0, G_OPTION_ARG_STRING, &o.disk,
          "The shared disk's target (required)", "vdb" },
        { "lock-space", 'l', 0, G_OPTION_ARG_STRING, &o.lock_space,
          "Cluster-wide name of the shared image (required)", "NAME" },
        { "coordinator", 'c', 0, G_OPTION_ARG_STRING_ARRAY, &o.coordinators,
          "extlockd address: unix:PATH or tcp:HOST:PORT (required; a list: "
          "ADDR,ADDR,... or repeated)", "ADDR" },
        { "client-id", 0, 0, G_OPTION_ARG_STRING, &o.client_id,
          "The node's client-id (default: the driver's, <host>/<node>)", "ID" },
        { "tls-creds-dir", 0, 0, G_OPTION_ARG_STRING, &o.tls_creds_dir,
          "TLS to the coordinator with QEMU credentials in DIR", "DIR" },
        { "tls-psk-user", 0, 0, G_OPTION_ARG_STRING, &o.tls_psk_user,
          "PSK credentials with this user name (default: x509)", "NAME" },
        { "tls-hostname", 0, 0, G_OPTION_ARG_STRING, &o.tls_hostname,
          "Name in the coordinator's certificate", "NAME" },
        { "lease-time", 0, 0, G_OPTION_ARG_INT64, &o.lease_time,
          "Lease asked of the coordinator", "MS" },
        { "on-lease-loss", 0, 0, G_OPTION_ARG_STRING, &o.on_lease_loss,
          "queue or error", "MODE" },
        { "lease-loss-timeout", 0, 0, G_OPTION_ARG_INT64,
          &o.lease_loss_timeout, "With queue: fail requests after MS", "MS" },
        { "option", 'o', 0, G_OPTION_ARG_STRING_ARRAY, &o.extra,
          "Another option of the extlock node (repeatable)", "KEY=VALUE" },
        { "node", 0, 0, G_OPTION_ARG_STRING, &o.node,
          "libvirt's node the extlock node goes on (default: computed, "
          "libvirt-N-format)", "NAME" },
        { "libvirt-version", 0, 0, G_OPTION_ARG_STRING, &o.libvirt_version,
          "The libvirt that runs the domain (default 9.0; from 9.10 on, "
          "raw disks have no format node)", "VERSION" },
        { "preallocated", 0, 0, G_OPTION_ARG_NONE, &o.preallocated,
          "The non-raw image of the disk is fully preallocated", NULL },
        { "output", 0, 0, G_OPTION_ARG_FILENAME, &o.output,
          "Write here (default: standard output)", "FILE" },
        { NULL }
    };
    GOptionContext *ctx = g_option_context_new("[DOMAIN.xml|-]");
    g_autoptr(GError) err = NULL;
    const char *input;
    xmlChar *out = NULL;
    int outlen = 0;
    FILE *f;

    g_option_context_set_summary(ctx,
        "Adds an extlock node under a <shareable/> disk of a libvirt domain "
        "XML\n(read from the file or standard input; see docs/libvirt.rst).");
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, &argc, &argv, &err)) {
        usage_error(ctx, "%s", err->message);
    }
    check_options(ctx, &o, argc);
    input = argc > 1 ? argv[1] : "-";

    if (strcmp(input, "-") != 0 && access(input, R_OK) != 0) {
        fail("%s: %s", input, g_strerror(errno));
    }
    xmlKeepBlanksDefault(0);
    doc = xmlReadFile(strcmp(input, "-") == 0 ? "/dev/stdin" : input, NULL,
                      XML_PARSE_NONET | XML_PARSE_NOERROR |
                      XML_PARSE_NOWARNING);
    if (!doc) {
        const xmlError *e = xmlGetLastError();

        fail("%s: not well-formed XML%s%s", input, e ? ": " : "",
             e ? g_strstrip(g_strdup(e->message)) : "");
    }
    convert(doc, input, &o);
    xmlDocDumpFormatMemoryEnc(doc, &out, &outlen, "UTF-8", 1);
    xmlFreeDoc(doc);
    if (o.output) {
        f = fopen(o.output, "w");
        if (!f) {
            fail("%s: %s", o.output, g_strerror(errno));
        }
    } else {
        f = stdout;
    }
    /* without the <?xml?> declaration, as virsh dumpxml writes it */
    {
        const char *body = (const char *)out;

        if (g_str_has_prefix(body, "<?xml")) {
            body = strchr(body, '\n') ? strchr(body, '\n') + 1 : body;
        }
        if (fputs(body, f) == EOF || (f != stdout && fclose(f) != 0) ||
            (f == stdout && fflush(f) != 0)) {
            fail("writing %s: %s", o.output ? o.output : "standard output",
                 g_strerror(errno));
        }
    }
    xmlFree(out);
    g_option_context_free(ctx);
    g_free(o.disk);
    g_free(o.lock_space);
    g_strfreev(o.coordinators);
    g_free(o.client_id);
    g_free(o.tls_creds_dir);
    g_free(o.tls_psk_user);
    g_free(o.tls_hostname);
    g_free(o.on_lease_loss);
    g_strfreev(o.extra);
    g_free(o.node);
    g_free(o.output);
    g_free(o.libvirt_version);
    return 0;
}
