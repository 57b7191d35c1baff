/*
 * ingest_internal.h — what the three files of the ingest share, and nothing
 * else includes: the request object, its states, and the calls between
 * ingest.c (the request: its owner, its body, records and rows, failure),
 * ingest_tx.c (its transaction: every database step of a POST, the COPY's
 * end and the dead letters' for both, the Idempotency-Key's claim and replay,
 * the answer built before COMMIT) and ingest_append.c (the steps of an
 * append to a resumable upload, docs/resumable.md).
 */
#ifndef JI_INGEST_INTERNAL_H
#define JI_INGEST_INTERNAL_H

#include <time.h>

#include "ingest.h"
#include "image_store.h"
#include "dead_letters.h"
#include "json_text.h"
#include "record_parser.h"
#include "splitter.h"

/** Message kept per reported error in skip mode. */
#define JI_REPORTED_ERROR_CHARS sizeof(((ji_error_t *)0)->message)

/* ji_ingest_fail and ji_ingest_free rely on the order: everything before ST_COMMIT may still fail */
typedef enum {
    ST_CONNECTING,
    ST_BEGIN,
    ST_CLAIM,       /**< lock_timeout set; with a key: its lock tried, the key looked up (ji_idempotency_claim) */
    ST_UP_LOCK,     /**< append: the opening message (BEGIN, the upload's lock tried, its row read and checked, COPY) */
    ST_UP_TAKEOVER, /**< append: the opening again, the holder of the upload's lock terminated, the lock waited for */
    ST_BATCH,
    ST_STREAMING,
    ST_REPLAY, /**< the key committed with an earlier request: the body is only hashed */
    ST_COPY_END,
    ST_DEAD_LETTERS, /**< the rejected records' COPY */
    ST_SUMMARY,
    ST_KEEP_ANSWER, /**< the answer and digest stored with the key */
    ST_UP_ERRORS,   /**< append completing in skip mode: the first rejected records of the whole upload read */
    ST_UP_KEY,      /**< append completing with an Idempotency-Key: the key claimed */
    ST_UP_BATCH,    /**< append completing: the batch created, the export horizon locked */
    ST_UP_MOVE,     /**< append completing: the staged rows moved into users */
    ST_UP_CLOSE,    /**< append: the upload's row updated (staged, or committed) */
    ST_COMMIT,
    ST_DONE,
    ST_FAILED,
} ingest_state_t;

typedef struct {
    uint64_t line;
    char field[32];
    char message[JI_REPORTED_ERROR_CHARS];
} reported_error_t;

struct st_ji_ingest_t {
    ji_ingest_env_t *env;
    ji_ingest_params_t params;
    const ji_ingest_callbacks_t *cb;
    void *owner;
    ingest_state_t state;
    ingest_state_t state_before_failure;
    bool ended;              /**< the owner fed every body byte */
    bool last_bytes;         /**< the next feed is the body's last: its rows go with COPY's end */
    bool lines_ended;        /**< the splitter saw the end of input */
    bool paused;             /**< COPY output backed up: waiting for the drain event */
    bool refused;            /**< the owner was given less than it offered: it waits for resume */
    bool record_mode;        /**< records come from ji_ingest_put_record, not from body bytes */
    bool replayed;           /**< answered from an earlier request with the same Idempotency-Key */
    bool keyed;              /**< an Idempotency-Key came with the request */
    bool key_locked;         /**< this transaction holds the key's advisory lock */
    bool unlock_rolled_back; /**< failing with the key's lock: ROLLBACK was sent */
    char key[JI_IDEMPOTENCY_KEY_CAP];
    ji_key_claim_t claim;
    ji_request_digest_t *digest;                       /**< of the content, with a key only */
    char replay_digest[JI_REQUEST_DIGEST_HEX_LEN + 1]; /**< REPLAY: the first request's ("": not kept) */
    char batch_key[40];                                /**< for the log */
    struct timespec started;

    ji_pg_t *pg;
    ji_image_batch_t *images;
    ji_splitter_t splitter;
    ji_record_parser_t *parser;

    /* the line being parsed */
    bool line_failed;
    bool line_has_image;
    ji_image_info_t line_image;

    char *copy_buf;
    size_t copy_len;
    int64_t batch_id;
    int64_t id_floor; /**< the export horizon's bound of the opening: every user_id of the batch is at least this */
    char batch_id_text[24];
    char first_id[24], last_id[24];

    uint64_t inserted, skipped, images_stored, bytes;
    reported_error_t *reported;
    size_t nreported;

    ji_error_t err;
    int status;
    unsigned retry_after;
    ji_text_t answer;

    ji_dead_letters_t *dead;     /**< skip mode: the rejected records (NULL otherwise) */
    ji_error_t line_error;       /**< skip mode: why the current line was rejected (line_failed) */
    h2o_timeout_entry_t defer;   /**< delivers callbacks from the loop */
    h2o_timeout_entry_t tx_step; /**< the transaction's next slice of work (dead letters) */
    bool pending_resume, pending_done;
    bool done_delivered; /**< the owner got done */

    /* a resumable upload's append (docs/resumable.md); `append` false for a POST /users */
    bool append;
    ji_ingest_append_t app; /**< copied from params.append */
    bool completing;        /**< the body completes the upload: the end moves every staged row into users */
    bool interrupted;       /**< ji_ingest_interrupt: the client is gone */
    bool orphan;            /**< freed by its owner after interrupt: frees itself once it answered */
    bool record_fault;      /**< the failure is a record's (fail mode): the upload fails with it */
    bool upload_failing;    /**< the upload is being marked failed before the answer */
    int64_t upload_id;      /**< 0 until the upload's row was found */
    char upload_id_text[24];
    char upload_key[40];    /**< the upload's batch_key: its final batch, its journals */
    int64_t length;         /**< the upload's length (-1: not known yet) */
    uint64_t start_offset;  /**< the durable offset the append began at */
    uint64_t lines_start;   /**< lines before start_offset */
    uint64_t seq;           /**< the upload's committed appends before this one */
    uint64_t fed;           /**< body bytes of this append taken (the last complete line ends at the splitter's
                              * ji_splitter_line_end_offset) */
    uint64_t result_offset; /**< ji_ingest_append_offset */
    uint64_t max_upload;    /**< --max-upload-bytes */
    ji_pg_call_t fail_call; /**< marks the upload failed (fail mode) */
    const char *fail_values[3];
    char fail_status[8];
};


/* ---- ingest.c ---- */

/**
 * Fails the request (no-op once it is done or failed): its files are removed, its transaction dropped (see
 * ji_ingest_tx_abort) and `err` answered.
 */
void ji_ingest_abort(ji_ingest_t *in, const ji_error_t *err);
/** Delivers the answer in in->status / in->answer to the owner from the loop. */
void ji_ingest_answer(ji_ingest_t *in);
/** The owner may feed again (when it is waiting for that). */
void ji_ingest_resume_owner(ji_ingest_t *in);
/** Ends the lines, sends the last rows, then ends the COPY; re-entered after each drain of the connection. */
void ji_ingest_finish_rows(ji_ingest_t *in);

/* ---- ingest_tx.c ---- */

/** Gets a connection and opens the transaction (everything after comes from the loop). 0, or -1 (no memory). */
int ji_ingest_tx_start(ji_ingest_t *in) JI_MUST_CHECK;
/** All rows were sent: ends the COPY and goes on to COMMIT. */
void ji_ingest_tx_end_copy(ji_ingest_t *in);
/** A replay's body was all read: the kept answer, or 422 for other content. */
void ji_ingest_tx_end_replay(ji_ingest_t *in);
/**
 * A database failure: PostgreSQL's (or libpq's) text `why` goes to stderr with the batch key and line; the answer
 * names only `what`, a fixed text. `res` (may be NULL) tells a lock timeout from other errors.
 */
void ji_ingest_tx_fail(ji_ingest_t *in, const char *what, const PGresult *res, const char *why);
/**
 * The failed request's connection: true when the answer must wait (ji_ingest_answer comes once the key's lock is
 * released), false when the connection went to be rolled back in the background.
 */
bool ji_ingest_tx_abort(ji_ingest_t *in) JI_MUST_CHECK;
/** Lines of the request (record mode: records) read so far: the answer's and the batch's "lines". */
uint64_t ji_ingest_lines(const ji_ingest_t *in);
/** Gives the connection back to be rolled back in the background (the answer does not wait). */
void ji_ingest_tx_release(ji_ingest_t *in);
/**
 * Sends `sql` (several statements, one message: ji_pg_script) in `state`, then frees it; a failure to send, or `sql`
 * out of memory, is the request's failure (`what`).
 */
void ji_ingest_tx_send_script(ji_ingest_t *in, ji_text_t *sql, ingest_state_t state, ji_pg_script_cb cb,
                              const char *what);
/** The success answer (POST /users JSON), built before COMMIT so that an Idempotency-Key can keep it with the batch. */
void ji_ingest_tx_build_answer(ji_ingest_t *in);
/** Answers 200 with what in->answer holds. */
void ji_ingest_tx_succeed(ji_ingest_t *in);
/** TTL of Idempotency-Keys (seconds). */
unsigned ji_ingest_tx_key_ttl(const ji_ingest_t *in);
/**
 * A committed request's connection goes back to the pool; once per sweep interval of this loop it first clears
 * expired Idempotency-Keys, in the background (the answer does not wait).
 */
void ji_ingest_tx_give_back(ji_ingest_t *in);
/** The connection is in COPY IN: the body streams (the rows go to the COPY, its drain events come back here). */
void ji_ingest_tx_stream(ji_ingest_t *in);

/**
 * What a request does with each outcome of its key's claim: go on (the key is free), answer from the kept answer
 * (the key committed earlier), or 409 with `running` (the key's first request still runs: never wait for it).
 */
typedef struct {
    void (*free)(ji_ingest_t *in);
    void (*committed)(ji_ingest_t *in, const ji_key_claim_t *claim);
    const char *running;
} ji_key_claim_steps_t;
/** The one switch over a claim's outcome (ji_idempotency_claim's callback), taking the request's `steps`. */
void ji_ingest_tx_settle_claim(ji_ingest_t *in, const ji_key_claim_t *claim, const ji_key_claim_steps_t *steps);

/* ---- ingest_append.c ---- */

/** An append's dead letters, staged with the upload's id (ingest_tx.c's COPY of the rejected records). */
#define JI_COPY_UPLOAD_REJECTED_SQL "COPY upload_rejected (upload_id, line, error, field, record, truncated) FROM STDIN"

/** Append, the connection obtained: the transaction, the upload's lock and row, then the COPY of its rows. */
void ji_ingest_append_open(ji_ingest_t *in);
/** Append: the complete lines are all staged (the COPY of this append's rows ended): stage or finish the upload. */
void ji_ingest_tx_end_append(ji_ingest_t *in);
/** Append, fail mode: a record ended the upload. Marks it failed (its staged rows and files dropped), then answers. */
void ji_ingest_tx_fail_upload(ji_ingest_t *in);

#endif
