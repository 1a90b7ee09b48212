package refetch.bench.peer;

import java.io.BufferedReader;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * The driver protocol of refetch-bench contenders (crates/refetch-bench/src/contender.rs): print
 * FIRST at the first record; stdin carries "END {json}" with the topic's end offsets once nothing
 * more is produced, and "STOP" (or the end of input) when the run is over; then print
 * REPORT {json} and exit. Completion, CPU time and RSS are judged by the driver from outside.
 * Every durable write is appended to the durable log ("id version unix-micros", one unbuffered
 * write per call, so it survives a SIGKILL).
 */
public final class Harness {
    public final String brokers;
    public final String topic;
    public final String group;
    public final String source;
    public final Path jsonl;
    public final Path durableLog;
    public final int partitions;
    /** Static group membership: the group.instance.id, or null. */
    public final String instanceId;
    public final Probe probe = new Probe();
    public final AtomicLong consumed = new AtomicLong();
    private final AtomicBoolean saidFirst = new AtomicBoolean();
    private final CountDownLatch stop = new CountDownLatch(1);
    private final FileOutputStream log;
    private volatile Map<Integer, Long> end;

    private Harness(Map<String, String> a) throws IOException {
        brokers = a.get("brokers");
        topic = a.get("topic");
        group = a.get("group");
        source = a.get("source");
        jsonl = a.containsKey("jsonl") ? Path.of(a.get("jsonl")) : null;
        durableLog = Path.of(a.get("durable-log"));
        partitions = Integer.parseInt(a.getOrDefault("partitions", "4"));
        instanceId = a.get("instance-id");
        log = new FileOutputStream(durableLog.toFile(), true);
    }

    /** Parse --key value arguments and start reading stdin. */
    public static Harness start(String[] args) throws IOException {
        Map<String, String> a = new HashMap<>();
        for (int i = 0; i + 1 < args.length; i += 2) {
            a.put(args[i].replaceFirst("^--", ""), args[i + 1]);
        }
        Harness h = new Harness(a);
        Thread t = new Thread(() -> {
            try {
                BufferedReader r = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
                String line;
                while ((line = r.readLine()) != null) {
                    if (line.startsWith("END ")) {
                        Map<Integer, Long> e = new HashMap<>();
                        Matcher m = Pattern.compile("\"(\\d+)\":(\\d+)").matcher(line);
                        while (m.find()) {
                            e.put(Integer.parseInt(m.group(1)), Long.parseLong(m.group(2)));
                        }
                        h.end = e;
                    } else if (line.trim().equals("STOP")) {
                        break;
                    }
                }
            } catch (Exception e) {
                e.printStackTrace();
            }
            h.stop.countDown();
        }, "stdin");
        t.setDaemon(true);
        t.start();
        return h;
    }

    /** Call for every record consumed. */
    public void consumedOne() {
        consumed.incrementAndGet();
        if (saidFirst.compareAndSet(false, true)) {
            System.out.println("FIRST");
            System.out.flush();
        }
    }

    /** The end offsets, once the driver sent them. */
    public Map<Integer, Long> endOffsets() {
        return end;
    }

    /** A write of id at version is durable now: tell the probe and the durable log. */
    public void durable(String id, long version) {
        probe.durable(id, version);
        java.time.Instant now = java.time.Instant.now();
        long micros = now.getEpochSecond() * 1_000_000L + now.getNano() / 1_000L;
        byte[] line = (id + " " + version + " " + micros + "\n").getBytes(StandardCharsets.UTF_8);
        synchronized (log) {
            try {
                log.write(line);
            } catch (IOException e) {
                e.printStackTrace();
            }
        }
    }

    /** Wait until the driver says STOP; onTick runs every 20 ms (the Kafka Streams harness sends heartbeats). */
    public void awaitStop(Runnable onTick) throws InterruptedException {
        while (!stop.await(20, TimeUnit.MILLISECONDS)) {
            if (onTick != null) {
                onTick.run();
            }
        }
    }

    /** Print the report. */
    public void report() {
        System.out.println(String.format(java.util.Locale.ROOT,
                "REPORT {\"consumed\":%d,\"probe\":%s}", consumed.get(), probe.summaryJson()));
        System.out.flush();
    }

    private static final Pattern ID = Pattern.compile("\"id\":\"([^\"]*)\"");
    private static final Pattern VERSION = Pattern.compile("\"version\":(\\d+)");

    /** (id, version or null) of a notification payload, or null. */
    public static Object[] parse(String payload) {
        if (payload == null) {
            return null;
        }
        Matcher i = ID.matcher(payload);
        if (!i.find()) {
            return null;
        }
        Matcher v = VERSION.matcher(payload);
        return new Object[] {i.group(1), v.find() ? Long.valueOf(v.group(1)) : null};
    }
}
