#!/usr/bin/python3
# Write the seed corpora of the fuzz harnesses (tests/fuzz/corpus/<harness>/):
# the protocol examples of docs/protocol.rst and the sessions the
# integration tests play, as files named after what they show.
# Usage: tests/fuzz/make-corpus.py   (from anywhere; rewrites the seeds)
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def write(harness, name, text):
    d = os.path.join(HERE, 'corpus', harness)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), 'wb') as f:
        f.write(text.encode())


# --- fuzz-protocol: single lines ------------------------------------------
with open(os.path.join(REPO, 'docs', 'protocol.rst')) as f:
    doc = f.read()
lines = sorted(set(re.findall(r'\{"type":.*\}', doc)))
n = 0
for line in lines:
    # "A -> {...}" transcripts and ``{...}`` literals; skip placeholders
    line = line.split('``')[0]
    if re.search(r'[:,]\s*[A-Z]\b|\.\.\.', line):
        continue
    write('fuzz-protocol', 'doc-%02d' % n, line)
    n += 1
extra = [
    '{"type":"hello","id":1,"version":2,"client-id":"hostA/disk0",'
    '"lock-space":"disk","lease-ms":10000,"session":'
    '"0123456789abcdef0123456789abcdef"}',
    '{"type":"lock","id":7,"offset":4096,"length":4096,"mode":"exclusive",'
    '"wait":false,"limit":{"offset":0,"length":1048576}}',
    '{"type":"reclaim","id":3,"offset":0,"length":512,"mode":"shared",'
    '"token":5497558138881}',
    '{"type":"reclaim-done","id":4}',
    '{"type":"downgrade","id":5,"lock":2}',
    '{"type":"welcome","id":1,"version":2,"session":'
    '"0123456789abcdef0123456789abcdef","lease-ms":1000,"epoch":6,'
    '"server":"extlockd 0.1.0","reclaim":true,"grace-remaining-ms":900,'
    '"locks":[{"lock":1,"offset":0,"length":4096,"mode":"exclusive",'
    '"token":5497558138881}]}',
    '{"type":"unlocked","id":3,"lock":1,"pieces":[{"lock":1,"offset":0,'
    '"length":4096},{"lock":3,"offset":8192,"length":57344}]}',
    '{"type":"session-expired","session":"0123456789abcdef0123456789abcdef",'
    '"message":"lease expired"}',
    '{"type":"revoke","lock":1,"offset":0,"length":4096,"mode":"shared",'
    '"token":2199033166550}',
    '{"type":"status-reply","id":9,"status":{"epoch":2,"sessions":[]}}',
    '{"type":"error","code":"parse-error","message":"invalid JSON"}',
    '{"type":"lock","id":1,"offset":0,"length":1,"mode":"shared","id":2}',
    '  {"type" : "unlock" , "id" : 3 , "lock" : 1 }  \r',
    '{"type":"lock","id":1,"offset":9223372036854775806,"length":1,'
    '"mode":"shared"}',
    '{"type":"renewed","id":1,"lease-ms":100}',
    '{"type":"cancel","id":1,"request":"2"}',
    'not json at all\n{"type":"bye","id":1}\n',
    '{"type":"pr-out","id":2,"action":"preempt-and-abort","pr-type":5,'
    '"key":"ffffffffffffffff","sa-key":"1","aptpl":true}',
    '{"type":"pr-update","seq":3,"generation":7,"pr-type":5,'
    '"holder":"hostA/disk0","aptpl":false,"registrants":[{"client-id":'
    '"hostA/disk0","key":"a1"},{"client-id":"hostB/disk0","key":"b2"}]}',
    '{"type":"pr-status","id":4,"seq":0,"generation":0,"pr-type":0,'
    '"aptpl":false,"registrants":[]}',
    '{"type":"pr-result","id":5,"result":"reservation-conflict",'
    '"generation":2,"seq":1}',
    '{"type":"pr-ack","id":6,"seq":9223372036854775807}',
    '{"type":"unlock","id":7,"lock":1,"maint-size":1073741824}',
    '{"type":"granted","id":8,"lock":1,"token":1099511627777,"offset":0,'
    '"length":4096,"mode":"shared","maint-gen":4294967297,'
    '"maint-size":4096}',
]
for i, line in enumerate(extra):
    write('fuzz-protocol', 'extra-%02d' % i, line)

# --- fuzz-dispatch: scripted sessions --------------------------------------
HELLO = ('{"type":"hello","id":1,"version":2,"client-id":"%s",'
         '"lock-space":"%s"%s}')


def hello(client, space='disk', extra=''):
    return HELLO % (client, space, extra)


def lock(i, off, length, mode, extra=''):
    return ('{"type":"lock","id":%d,"offset":%d,"length":%d,"mode":"%s"%s}'
            % (i, off, length, mode, extra))


sessions = {
    # The example session of docs/protocol.rst
    'doc-example': [
        '0:' + hello('hostA/disk0', 'cluster-disk', ',"lease-ms":10000'),
        '0:' + lock(2, 0, 65536, 'exclusive'),
        '1:' + hello('hostB/disk0', 'cluster-disk'),
        '1:' + lock(2, 4096, 4096, 'shared'),
        '1:' + lock(3, 0, 512, 'shared', ',"wait":false'),
        '0:{"type":"unlock","id":3,"lock":1,"offset":4096,"length":4096}',
        '1:' + lock(4, 8192, 4096, 'exclusive'),
        '1:{"type":"cancel","id":5,"request":4}',
        '1:' + lock(6, 100, 0, 'shared'),
        '1:{"type":"renew","id":7}',
        '0:{"type":"bye","id":4}',
        '1:{"type":"bye","id":8}',
    ],
    # Lock caching: limits, revokes, downgrade
    'cache-revoke-downgrade': [
        '0:' + hello('hostA/disk0'),
        '0:' + lock(2, 4096, 4096, 'exclusive',
                    ',"limit":{"offset":0,"length":1073741824}'),
        '1:' + hello('hostB/disk0'),
        '1:' + lock(2, 65536, 4096, 'shared',
                    ',"limit":{"offset":0,"length":1048576}'),
        '0:{"type":"downgrade","id":3,"lock":1}',
        '0:{"type":"unlock","id":4,"lock":1,"offset":0,"length":4096}',
        '1:{"type":"status","id":3}',
        '0:{"type":"unlock","id":5,"lock":1}',
        '1:{"type":"bye","id":4}',
    ],
    # Restart: the listed sessions reclaim, a new one waits for the grace
    'restart-reclaim': [
        '#R',
        '0:' + hello('hostA/disk0', 'disk',
                     ',"session":"0123456789abcdef0123456789abcdef"'),
        '0:{"type":"reclaim","id":2,"offset":0,"length":4096,'
        '"mode":"exclusive","token":5497558138881}',
        '2:' + hello('hostC/disk0'),
        '2:' + lock(2, 0, 512, 'shared'),
        '1:' + hello('hostB/disk0', 'disk',
                     ',"session":"fedcba9876543210fedcba9876543210"'),
        '1:{"type":"reclaim","id":2,"offset":0,"length":4096,'
        '"mode":"shared","token":5497558138882}',
        '1:{"type":"reclaim","id":3,"offset":8192,"length":4096,'
        '"mode":"shared","token":5497558138883}',
        '0:{"type":"reclaim-done","id":3}',
        '1:{"type":"reclaim-done","id":4}',
        '0:{"type":"unlock","id":4,"lock":1}',
        '2:{"type":"status","id":3}',
    ],
    # Restart where a listed session never comes back
    'restart-grace-timeout': [
        '#R',
        '0:' + hello('hostA/disk0', 'disk',
                     ',"session":"0123456789abcdef0123456789abcdef"'),
        '0:{"type":"reclaim","id":2,"offset":0,"length":4096,'
        '"mode":"exclusive","token":5497558138881}',
        '1:' + hello('hostC/disk0'),
        '1:' + lock(2, 0, 4096, 'exclusive'),
        '1:{"type":"cancel","id":3,"request":2}',
        '1:' + lock(4, 0, 4096, 'shared'),
        'T1600',
        '0:{"type":"reclaim","id":3,"offset":65536,"length":4096,'
        '"mode":"shared","token":5497558138884}',
        'T300',
        '0:{"type":"bye","id":4}',
    ],
    # Disconnect and resume the session on another connection
    'resume': [
        '0:' + hello('hostA/disk0', 'disk', ',"lease-ms":2000'),
        '0:' + lock(2, 0, 4096, 'exclusive'),
        '1:' + hello('hostB/disk0'),
        '1:' + lock(2, 0, 4096, 'exclusive'),
        '0!',
        'T500',
        '2:' + hello('hostA/disk0', 'disk', ',"session":"@S"'),
        '2:{"type":"unlock","id":2,"lock":1}',
        '2:{"type":"bye","id":3}',
    ],
    # A lease lapses: the waiter is granted after the fencing margin
    'lease-expiry': [
        '0:' + hello('hostA/disk0', 'disk', ',"lease-ms":100'),
        '0:' + lock(2, 0, 1048576, 'exclusive'),
        '1:' + hello('hostB/disk0'),
        '1:' + lock(2, 4096, 4096, 'exclusive'),
        'T150',
        '0:{"type":"renew","id":3}',
        'T150',
        '1:{"type":"renew","id":3}',
        '0:' + lock(4, 0, 1, 'shared'),
        'T2000',
    ],
    # The token counter runs out: the epoch changes
    'epoch-wrap': [
        '#W',
        '0:' + hello('hostA/disk0'),
        '0:' + lock(2, 0, 1, 'shared'),
        '0:' + lock(3, 1, 1, 'shared'),
        '0:' + lock(4, 2, 1, 'shared'),
        '0:' + lock(5, 3, 1, 'exclusive'),
        '0:{"type":"status","id":6}',
    ],
    # Clients that hang up with requests unread, maybe while their input
    # is paused (a hello waiting for the state file): only unlock, bye,
    # downgrade, cancel, reclaim-done and a subscribed pr-ack are applied
    'hangup-while-paused': [
        '0:' + hello('hostA/disk0', 'disk', ',"lease-ms":1000'),
        '0:' + lock(2, 0, 4096, 'exclusive'),
        '1:' + hello('hostB/disk0'),
        '1:' + lock(2, 0, 4096, 'exclusive'),
        '2:' + hello('hostC/disk0'),
        '2:' + lock(2, 0, 4096, 'shared'),
        '2:{"type":"renew","id":3}',
        '2:{"type":"pr-ack","id":4,"seq":0}',
        '2:{"type":"bye","id":5}',
        '2!',
        '3:' + hello('hostD/disk0'),
        '3:' + lock(2, 8192, 4096, 'shared'),
        '3:' + hello('hostA/disk0', 'disk', ',"session":"@S"'),
        '3!',
        '0:{"type":"downgrade","id":3,"lock":1}',
        '0:{"type":"unlock","id":4,"lock":1}',
        '0!',
        'T1500',
    ],
    # Malformed input, requests in the wrong state, partial lines
    'malformed': [
        '0:{"type":"status","id":1}',
        '0:{"type":"lock","id":2,"offset":0,"length":1,"mode":"shared"}',
        '0:{"type":"lock",',
        '0:[1,2,3]',
        '0:{"type":"welcome","id":3}',
        '0:{"type":"frobnicate","id":4}',
        '0:' + hello('hostA/disk0', 'disk', ',"version":2'),
        '0+{"type":"hello","id":5,"version":2,',
        '0:"client-id":"a","lock-space":"disk"}',
        '0:' + lock(6, 18446744073709551615, 1, 'shared'),
        '0:{"type":"unlock","id":7,"lock":99}',
        '0:{"type":"downgrade","id":8,"lock":99}',
        '0:{"type":"cancel","id":9,"request":99}',
        '0:{"type":"reclaim","id":10,"offset":0,"length":1,"mode":"shared",'
        '"token":1}',
        '0:{"type":"reclaim-done","id":11}',
        '0:' + hello('hostA/disk0'),
        '0:{"type":"bye","id":12}',
        '0:{"type":"status","id":13}',
    ],
    # Many waiters, partial unlocks, limits per session
    'queue': [
        '0:' + hello('a'),
        '1:' + hello('b'),
        '2:' + hello('c'),
        '3:' + hello('d', 'other'),
        '0:' + lock(2, 0, 100, 'shared'),
        '1:' + lock(2, 50, 100, 'exclusive'),
        '2:' + lock(2, 0, 10, 'shared'),
        '2:' + lock(3, 140, 10, 'shared', ',"wait":false'),
        '0:{"type":"unlock","id":3,"lock":1,"offset":40,"length":20}',
        '0:{"type":"unlock","id":4,"lock":1}',
        '3:' + lock(2, 0, 100, 'exclusive'),
        '1:{"type":"bye","id":3}',
        '2!',
        '3:{"type":"status","id":3}',
        'T3000',
    ],
    # A cached lock grows between its neighbours' locks
    'grow-between-neighbours': [
        '0:' + hello('a'),
        '0:' + lock(2, 0, 4096, 'exclusive'),
        '0:' + lock(3, 1048576, 4096, 'shared'),
        '1:' + hello('b'),
        '1:' + lock(2, 65536, 4096, 'exclusive',
                    ',"limit":{"offset":0,"length":2097152}'),
        '1:' + lock(3, 8192, 512, 'shared',
                    ',"limit":{"offset":4096,"length":61440}'),
        '2:' + hello('c'),
        '2:' + lock(2, 900000, 4096, 'shared',
                    ',"limit":{"offset":0,"length":1073741824}'),
        '1:{"type":"status","id":4}',
    ],
    # A caching session waits while a conflicting lock is granted
    'revoke-waiter': [
        '0:' + hello('a'),
        '0:' + lock(2, 0, 4096, 'exclusive',
                    ',"limit":{"offset":0,"length":65536}'),
        '1:' + hello('b'),
        '1:' + lock(2, 0, 4096, 'shared',
                    ',"limit":{"offset":0,"length":65536}'),
        '2:' + hello('c'),
        '2:' + lock(2, 0, 4096, 'exclusive',
                    ',"limit":{"offset":0,"length":65536}'),
        '0:{"type":"unlock","id":3,"lock":1}',
        '1:{"type":"downgrade","id":3,"lock":2}',
        '1:{"type":"unlock","id":4,"lock":2}',
    ],
    # Resume a session that holds several locks and has a waiter
    'resume-many-locks': [
        '1:' + hello('b'),
        '0:' + hello('a', 'disk', ',"lease-ms":5000'),
        '0:' + lock(2, 8192, 4096, 'exclusive'),
        '0:' + lock(3, 0, 4096, 'shared'),
        '0:' + lock(4, 65536, 4096, 'shared'),
        '1:' + lock(2, 65536, 1, 'exclusive'),
        '0!',
        'T1000',
        '2:' + hello('a', 'disk', ',"session":"@S"'),
        '2:{"type":"unlock","id":2,"lock":3}',
        '2:{"type":"status","id":3}',
        '3:' + hello('a', 'disk', ',"session":"@S"'),
        '3:{"type":"renew","id":2}',
        '2:{"type":"renew","id":4}',
    ],
    # Persistent reservations: register, reserve, preempt and abort the
    # other client, an update that is acked late, a session that resumes
    # and gets the state, bad actions and keys
    'reservations': [
        '0:' + hello('hostA/disk0', 'disk', ',"lease-ms":2000'),
        '1:' + hello('hostB/disk0', 'disk', ',"lease-ms":2000'),
        '1:{"type":"pr-in","id":2}',
        '0:{"type":"pr-out","id":2,"action":"register","sa-key":"a1"}',
        '1:{"type":"pr-ack","id":3,"seq":1}',
        '1:{"type":"pr-out","id":4,"action":"register","sa-key":"b2"}',
        '0:{"type":"pr-ack","id":3,"seq":2}',
        '0:{"type":"pr-out","id":4,"action":"reserve","pr-type":5,'
        '"key":"a1"}',
        '1:' + lock(5, 0, 4096, 'exclusive'),
        '1:{"type":"pr-ack","id":6,"seq":3}',
        '0:{"type":"pr-out","id":5,"action":"preempt-and-abort",'
        '"pr-type":1,"key":"a1","sa-key":"b2","aptpl":true}',
        '1:{"type":"pr-ack","id":7,"seq":4}',
        '0:{"type":"pr-out","id":6,"action":"register-and-move"}',
        '0:{"type":"pr-out","id":7,"action":"reserve","pr-type":16}',
        '0:{"type":"pr-out","id":8,"action":"register","key":"00112233445566778"}',
        '0:{"type":"pr-ack","id":9,"seq":99}',
        '0!',
        'T500',
        '2:' + hello('hostA/disk0', 'disk', ',"session":"@S"'),
        '2:{"type":"pr-out","id":2,"action":"clear","key":"a1"}',
        '2:{"type":"pr-in","id":3}',
        '2:{"type":"status","id":4}',
        'T3000',
    ],
    # Maintenance: the whole-space exclusive lock waits for a holder that
    # keeps its lock beyond its lease; its unlock announces a new size
    'maintenance': [
        '0:' + hello('hostA/disk0', 'disk', ',"lease-ms":1000'),
        '0:' + lock(2, 0, 4096, 'shared',
                    ',"limit":{"offset":0,"length":1048576}'),
        '1:' + hello('hostB/disk0'),
        '1:' + lock(2, 0, 9223372036854775808, 'exclusive'),
        '0:{"type":"renew","id":3}',
        'T600',
        '0:{"type":"renew","id":4}',
        'T600',
        '1:{"type":"renew","id":3}',
        'T1500',
        '1:{"type":"unlock","id":4,"lock":2,"maint-size":1073741824}',
        '2:' + hello('hostC/disk0'),
        '2:' + lock(2, 4096, 4096, 'exclusive'),
        '2:' + lock(3, 0, 9223372036854775808, 'exclusive'),
        '2:{"type":"downgrade","id":4,"lock":2}',
        '2:{"type":"unlock","id":5,"lock":3,"maint-size":1}',
        '2:{"type":"status","id":6}',
    ],
    # PREEMPT AND ABORT answered from the lease timer: the session whose
    # lease lapses comes before the preempted one in the timer's walk
    'preempt-during-lease-check': [
        '0:' + hello('hostA/disk0', 'disk', ',"lease-ms":2000'),
        '1:' + hello('hostB/disk0', 'disk', ',"lease-ms":5000'),
        '2:' + hello('hostC/disk0', 'disk', ',"lease-ms":5000'),
        '0:{"type":"pr-in","id":2}',
        '1:{"type":"pr-in","id":2}',
        '1:{"type":"pr-out","id":3,"action":"register","sa-key":"b2"}',
        '0:{"type":"pr-ack","id":3,"seq":1}',
        '2:{"type":"pr-out","id":2,"action":"register","sa-key":"c3"}',
        '0:{"type":"pr-ack","id":4,"seq":2}',
        '1:{"type":"pr-ack","id":4,"seq":2}',
        '2:{"type":"pr-out","id":3,"action":"preempt-and-abort",'
        '"key":"c3","sa-key":"b2"}',
        '1:{"type":"pr-ack","id":5,"seq":3}',
        '0!',
        'T2500',
        '2:{"type":"status","id":4}',
    ],
    # '#P': the policy allows read, write, reserve and 2 registrations
    # per lock-space: freeze, maintenance and a third registration refused
    'policy-actions': [
        '#P',
        '0:' + hello('hostA/disk0'),
        '0:' + lock(2, 0, 4096, 'shared'),
        '0:' + lock(3, 4096, 4096, 'exclusive'),
        '0:' + lock(4, 0, 9223372036854775808, 'shared'),
        '0:' + lock(5, 0, 9223372036854775808, 'exclusive'),
        '0:{"type":"pr-out","id":6,"action":"register","sa-key":"a1"}',
        '1:' + hello('hostB/disk0'),
        '1:{"type":"pr-out","id":2,"action":"register","sa-key":"b2"}',
        '0:{"type":"pr-ack","id":7,"seq":2}',
        '2:' + hello('hostC/disk0'),
        '2:{"type":"pr-out","id":2,"action":"register-and-ignore",'
        '"sa-key":"c3"}',
        '1:{"type":"pr-out","id":3,"action":"register","key":"b2",'
        '"sa-key":"0"}',
        '0:{"type":"pr-ack","id":8,"seq":3}',
        '2:{"type":"pr-out","id":3,"action":"register","sa-key":"c3"}',
        '0:{"type":"status","id":9}',
    ],
    # An emptied reservation state is forgotten once the lock-space has
    # no session; its seq goes on when the lock-space is used again
    'pr-state-forgotten': [
        '0:' + hello('hostA/disk0', 'scratch'),
        '0:{"type":"pr-in","id":2}',
        '0:{"type":"pr-out","id":3,"action":"register","sa-key":"a1"}',
        '0:{"type":"pr-out","id":4,"action":"register","key":"a1",'
        '"sa-key":"0"}',
        '0:{"type":"bye","id":5}',
        '0!',
        '1:' + hello('hostB/disk0', 'scratch'),
        '1:{"type":"pr-in","id":2}',
        '1:{"type":"pr-out","id":3,"action":"register","sa-key":"b1"}',
        '1:{"type":"status","id":4}',
    ],
}
for name, cmds in sessions.items():
    write('fuzz-dispatch', name, '\n'.join(cmds) + '\n')
