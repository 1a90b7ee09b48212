package refetch.bench.peer;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.Map;

/**
 * Notification-to-durable latency, defined as in the Rust contenders (crates/refetch-bench/src/probe.rs):
 * from the receipt of (id, version) to the first durable write of id at a version >= it; a
 * notification that arrives when such a write is already durable counts as zero. 2% log buckets.
 */
public final class Probe {
    private static final double GROWTH = 1.02;
    private static final int BUCKETS = 1200;
    private final long[] counts = new long[BUCKETS];
    private long total;
    private long received;
    private final Map<String, Long> durable = new HashMap<>();
    private final Map<String, ArrayList<long[]>> waiting = new HashMap<>();

    private void record(long micros) {
        int i = (int) (Math.log(micros + 1.0) / Math.log(GROWTH));
        counts[Math.min(i, BUCKETS - 1)]++;
        total++;
    }

    /** A notification for id (at version, or null when it carries none) was received now. */
    public synchronized void received(String id, Long version) {
        long now = System.nanoTime();
        received++;
        if (version == null) {
            return;
        }
        Long d = durable.get(id);
        if (d != null && d >= version) {
            record(0);
            return;
        }
        waiting.computeIfAbsent(id, k -> new ArrayList<>()).add(new long[] {version, now});
    }

    /** A write of id at version is durable now. */
    public synchronized void durable(String id, long version) {
        long now = System.nanoTime();
        durable.merge(id, version, Math::max);
        ArrayList<long[]> list = waiting.get(id);
        if (list == null) {
            return;
        }
        list.removeIf(w -> {
            if (w[0] <= version) {
                record((now - w[1]) / 1000);
                return true;
            }
            return false;
        });
        if (list.isEmpty()) {
            waiting.remove(id);
        }
    }

    public synchronized long received() {
        return received;
    }

    public synchronized long waitingCount() {
        long n = 0;
        for (ArrayList<long[]> l : waiting.values()) {
            n += l.size();
        }
        return n;
    }

    public synchronized Map<String, Long> durableVersions() {
        return new HashMap<>(durable);
    }

    private Double quantileMs(double q) {
        if (total == 0) {
            return null;
        }
        long rank = Math.max(1, Math.min(total, (long) Math.ceil(q * total)));
        long seen = 0;
        for (int i = 0; i < BUCKETS; i++) {
            seen += counts[i];
            if (seen >= rank) {
                return (Math.pow(GROWTH, i + 1) - 1.0) / 1000.0;
            }
        }
        return null;
    }

    /** The summary as JSON, in the Rust ProbeSummary's shape (buckets included, for merging). */
    public synchronized String summaryJson() {
        StringBuilder b = new StringBuilder("[");
        for (int i = 0; i < BUCKETS; i++) {
            if (counts[i] > 0) {
                if (b.length() > 1) {
                    b.append(',');
                }
                b.append('[').append(i).append(',').append(counts[i]).append(']');
            }
        }
        b.append(']');
        return String.format(java.util.Locale.ROOT,
                "{\"received\":%d,\"satisfied\":%d,\"p50_ms\":%s,\"p99_ms\":%s,\"waiting\":%d,\"buckets\":%s}",
                received, total, quantileMs(0.5), quantileMs(0.99), waitingCount(), b);
    }
}
