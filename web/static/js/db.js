// The browser's own durable state, in IndexedDB: one database per signed-in user.
//
// Stores
//   meta           {k, ...}: "device" holds the device id and its private keys as
//                  non-extractable CryptoKeys (IndexedDB keeps CryptoKeys as they are);
//   messages       decrypted messages, key "<sender>/<id>", index by conversation and time;
//   outbox         messages written but not yet acknowledged by the node, in order;
//   contacts       each contact's devices (public keys) and whether they were verified;
//   conversations  the conversation list as last seen, so it shows before the network answers.

const VERSION = 1;

function promised(request) {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

function finished(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("transaction aborted"));
  });
}

export class LocalStore {
  constructor(db) {
    this.db = db;
  }

  static name(address) {
    return `moot:${address}`;
  }

  static async open(address) {
    const request = indexedDB.open(LocalStore.name(address), VERSION);
    request.onupgradeneeded = () => {
      const db = request.result;
      db.createObjectStore("meta", { keyPath: "k" });
      const messages = db.createObjectStore("messages", { keyPath: "key" });
      messages.createIndex("conv", ["conversation", "ts"]);
      db.createObjectStore("outbox", { keyPath: "id" });
      db.createObjectStore("contacts", { keyPath: "address" });
      db.createObjectStore("conversations", { keyPath: "peer" });
    };
    return new LocalStore(await promised(request));
  }

  static async destroy(address) {
    await promised(indexedDB.deleteDatabase(LocalStore.name(address)));
  }

  close() {
    this.db.close();
  }

  async get(store, key) {
    return promised(this.db.transaction(store).objectStore(store).get(key));
  }

  async all(store) {
    return promised(this.db.transaction(store).objectStore(store).getAll());
  }

  /** Write values to one or more stores in one transaction, committed to disk before resolving. */
  async put(writes) {
    const names = [...new Set(writes.map(([store]) => store))];
    if (!names.length) return;
    const tx = this.db.transaction(names, "readwrite", { durability: "strict" });
    for (const [store, value] of writes) tx.objectStore(store).put(value);
    await finished(tx);
  }

  async delete(store, key) {
    const tx = this.db.transaction(store, "readwrite", { durability: "strict" });
    tx.objectStore(store).delete(key);
    await finished(tx);
  }

  /**
   * Keep the envelope made for an outbox item, unless one is there already (another
   * tab made it first: those are the bytes to send, so that the node stores one).
   * `replace` overwrites (after the node refused the old one). Returns the item, or
   * null if it left the outbox meanwhile.
   */
  async saveEnvelope(id, envelope, { replace = false } = {}) {
    const tx = this.db.transaction("outbox", "readwrite", { durability: "strict" });
    const store = tx.objectStore("outbox");
    const item = await promised(store.get(id));
    if (item && (replace || !item.envelope)) {
      item.envelope = envelope;
      store.put(item);
    }
    await finished(tx);
    return item || null;
  }

  /** Messages of one conversation before time `beforeTs`, newest first, at most `limit`. */
  async messagesOf(conversation, { beforeTs = Infinity, limit = 100 } = {}) {
    const range = IDBKeyRange.bound([conversation, -Infinity], [conversation, beforeTs], false, true);
    const index = this.db.transaction("messages").objectStore("messages").index("conv");
    const out = [];
    await new Promise((resolve, reject) => {
      const request = index.openCursor(range, "prev");
      request.onerror = () => reject(request.error);
      request.onsuccess = () => {
        const cursor = request.result;
        if (!cursor || out.length >= limit) return resolve();
        out.push(cursor.value);
        cursor.continue();
      };
    });
    return out;
  }
}

/** The address last signed in on this browser (not a secret: the session is the HttpOnly cookie). */
export const lastUser = {
  get: () => localStorage.getItem("moot:last-user"),
  set: (address) => localStorage.setItem("moot:last-user", address),
};
