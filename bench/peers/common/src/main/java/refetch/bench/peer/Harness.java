package refetch.bench.peer;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.TopicPartition;

/**
 * The driver protocol of refetch-bench contenders (crates/refetch-bench/src/contender.rs): print
 * FIRST at the first record, read the topic's end offsets as one JSON line on stdin, print
 * REPORT {json} once the group's commits reach them and every notification is covered by a durable
 * write (or the time cap is hit).
 */
public final class Harness {
    public final String brokers;
    public final String topic;
    public final String group;
    public final String source;
    public final Path jsonl;
    public final Duration cap;
    public final Path versionsOut;
    public final Probe probe = new Probe();
    public final AtomicLong consumed = new AtomicLong();
    private final AtomicBoolean saidFirst = new AtomicBoolean();
    private volatile long firstNanos;
    private volatile Map<Integer, Long> end;

    private Harness(Map<String, String> a) {
        brokers = a.get("brokers");
        topic = a.get("topic");
        group = a.get("group");
        source = a.get("source");
        jsonl = a.containsKey("jsonl") ? Path.of(a.get("jsonl")) : null;
        cap = parseDuration(a.getOrDefault("cap", "120s"));
        versionsOut = Path.of(a.get("versions-out"));
    }

    /** A humantime-style duration: "90000ms", "90s", "1m 30s". */
    static Duration parseDuration(String s) {
        Matcher m = Pattern.compile("(\\d+)\\s*(ms|min|s|m|h)?").matcher(s.trim());
        Duration d = Duration.ZERO;
        boolean any = false;
        while (m.find()) {
            any = true;
            long n = Long.parseLong(m.group(1));
            String unit = m.group(2) == null ? "s" : m.group(2);
            d = d.plus(switch (unit) {
                case "ms" -> Duration.ofMillis(n);
                case "m", "min" -> Duration.ofMinutes(n);
                case "h" -> Duration.ofHours(n);
                default -> Duration.ofSeconds(n);
            });
        }
        return any ? d : Duration.ofSeconds(120);
    }

    /** Parse --key value arguments and start reading stdin. */
    public static Harness start(String[] args) {
        Map<String, String> a = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            a.put(args[i].replaceFirst("^--", ""), args[i + 1]);
        }
        Harness h = new Harness(a);
        Thread t = new Thread(() -> {
            try {
                BufferedReader r = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
                String line = r.readLine();
                if (line != null) {
                    Map<Integer, Long> e = new HashMap<>();
                    Matcher m = Pattern.compile("\"(\\d+)\":(\\d+)").matcher(line);
                    while (m.find()) {
                        e.put(Integer.parseInt(m.group(1)), Long.parseLong(m.group(2)));
                    }
                    h.end = e;
                }
            } catch (Exception e) {
                e.printStackTrace();
            }
        }, "stdin");
        t.setDaemon(true);
        t.start();
        return h;
    }

    /** Call for every record consumed. */
    public void consumedOne() {
        consumed.incrementAndGet();
        if (saidFirst.compareAndSet(false, true)) {
            firstNanos = System.nanoTime();
            System.out.println("FIRST");
            System.out.flush();
        }
    }

    /** The end offsets, once the driver sent them. */
    public Map<Integer, Long> endOffsets() {
        return end;
    }

    public Properties adminProps() {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        return p;
    }

    /** Result of waiting: the committed record count, and whether the cap was hit. */
    public record Done(long committed, boolean capped, long doneNanos) {}

    /**
     * Wait until the group's commits reach the end offsets and every notification is covered by a
     * durable write, or the cap. onTick runs every poll (the Kafka Streams harness sends heartbeats).
     */
    public Done awaitDone(Runnable onTick) throws Exception {
        long started = System.nanoTime();
        try (Admin admin = Admin.create(adminProps())) {
            while (true) {
                Thread.sleep(20);
                if (onTick != null) {
                    onTick.run();
                }
                Map<Integer, Long> e = end;
                long committed = 0;
                boolean reached = e != null;
                if (saidFirst.get()) {
                    Map<TopicPartition, OffsetAndMetadata> offs = admin.listConsumerGroupOffsets(group)
                            .partitionsToOffsetAndMetadata().get();
                    Map<Integer, Long> byPartition = new HashMap<>();
                    for (var x : offs.entrySet()) {
                        if (x.getKey().topic().equals(topic) && x.getValue() != null) {
                            byPartition.put(x.getKey().partition(), x.getValue().offset());
                        }
                    }
                    for (long o : byPartition.values()) {
                        committed += o;
                    }
                    if (e != null) {
                        long expected = 0;
                        for (var x : e.entrySet()) {
                            expected += x.getValue();
                            long c = byPartition.getOrDefault(x.getKey(), 0L);
                            if (x.getValue() > 0 && c < x.getValue()) {
                                reached = false;
                            }
                        }
                        if (probe.waitingCount() > 0 || probe.received() < expected) {
                            reached = false;
                        }
                    }
                    if (reached) {
                        return new Done(committed, false, System.nanoTime());
                    }
                    if (System.nanoTime() - firstNanos > cap.toNanos()) {
                        return new Done(committed, true, System.nanoTime());
                    }
                } else if (System.nanoTime() - started > Duration.ofSeconds(90).toNanos()) {
                    throw new IllegalStateException("no record within 90 s");
                }
            }
        }
    }

    static long vmhwmKb() {
        try {
            for (String l : Files.readAllLines(Path.of("/proc/self/status"))) {
                if (l.startsWith("VmHWM:")) {
                    return Long.parseLong(l.replaceAll("[^0-9]", ""));
                }
            }
        } catch (Exception e) {
            // not on Linux
        }
        return 0;
    }

    /** Write the durable versions and print the report. */
    public void report(Done done) throws Exception {
        StringBuilder v = new StringBuilder("{");
        boolean first = true;
        for (var x : probe.durableVersions().entrySet()) {
            if (!first) {
                v.append(',');
            }
            first = false;
            v.append('"').append(x.getKey()).append("\":").append(x.getValue());
        }
        Files.writeString(versionsOut, v.append('}').toString());
        double elapsed = (done.doneNanos() - firstNanos) / 1e9;
        System.out.println(String.format(java.util.Locale.ROOT,
                "REPORT {\"consumed\":%d,\"committed\":%d,\"elapsed_s\":%.6f,\"capped\":%b,\"probe\":%s,\"vmhwm_kb\":%d,\"distinct_pairs_consumed\":null}",
                consumed.get(), done.committed(), elapsed, done.capped(), probe.summaryJson(), vmhwmKb()));
        System.out.flush();
    }

    private static final Pattern ID = Pattern.compile("\"id\":\"([^\"]*)\"");
    private static final Pattern VERSION = Pattern.compile("\"version\":(\\d+)");

    /** (id, version) of a notification payload, or null. */
    public static Object[] parse(String payload) {
        if (payload == null) {
            return null;
        }
        Matcher i = ID.matcher(payload);
        Matcher v = VERSION.matcher(payload);
        if (i.find() && v.find()) {
            return new Object[] {i.group(1), Long.parseLong(v.group(1))};
        }
        return null;
    }
}
