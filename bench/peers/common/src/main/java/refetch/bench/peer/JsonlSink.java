package refetch.bench.peer;

import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.List;

/**
 * The same JSON Lines format as refetch_sinks::jsonl (so the driver reads every sink back the same
 * way): one line per upsert, appended and fsynced (force) before the write returns. A null path
 * makes it the null sink.
 */
public final class JsonlSink {
    /** One entity to write. */
    public record Write(String id, long version, String body) {}

    private final FileChannel channel;

    public JsonlSink(Path path) throws IOException {
        this.channel = path == null ? null
                : FileChannel.open(path, StandardOpenOption.CREATE, StandardOpenOption.WRITE, StandardOpenOption.APPEND);
    }

    /** Append the batch and fsync it. */
    public synchronized void write(List<Write> batch) throws IOException {
        if (channel == null || batch.isEmpty()) {
            return;
        }
        StringBuilder sb = new StringBuilder();
        for (Write w : batch) {
            sb.append("{\"type\":\"entity\",\"id\":\"").append(w.id())
              .append("\",\"op\":\"upsert\",\"version\":").append(w.version())
              .append(",\"version_kind\":\"int\",\"content_type\":\"application/json\",\"body\":")
              .append(w.body().strip()).append("}\n");
        }
        ByteBuffer buf = ByteBuffer.wrap(sb.toString().getBytes(StandardCharsets.UTF_8));
        while (buf.hasRemaining()) {
            channel.write(buf);
        }
        channel.force(false);
    }
}
