"""Node-to-node federation.

- ``wire``: the ``/moot/federation/1`` and ``/moot/keys/1`` frames and their framing (sans-IO);
- ``events``: the signed events nodes exchange, and their verification (sans-IO);
- ``session``: both ends of a federation stream as state machines, backoff, misbehaviour (sans-IO);
- ``identity``: peer ids of Ed25519 node keys and the keys inside them (sans-IO);
- ``records``: the signed node record published in the DHT, its checks and the choice between claims (sans-IO);
- ``announcement``: what a node announces about itself by mDNS, the TXT record (sans-IO);
- ``mdns``: announcing and browsing with python-zeroconf on the configured interfaces, bridged into trio;
- ``blobwire``: the ``/moot/blobs/1`` frames and the receiving end of a blob (sans-IO);
- ``blobs``: serving this node's attachments to other nodes and fetching theirs;
- ``host``: the libp2p host under the node's key (imports libp2p: only the composition root loads it);
- ``service``: the senders, the receiving end and the key lookup, behind ``node.remote.Remote``.
"""
